"""outboxer-inbox's database errors name where its URL comes from.

``outboxer-inbox`` has no ``--db``: its database is the engine of the application's
session factory. Its one-line errors said "fix --db / OUTBOXER_DB" (review 7, a new
user), a flag it does not have and a variable it does not read.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from .cli_apps import closed_port


def test_an_unreachable_database_names_the_applications_engine_not_db(tmp_path: Path) -> None:
    (tmp_path / "unreachable_app.py").write_text(
        textwrap.dedent(
            f"""
            from sqlalchemy import create_engine
            from sqlalchemy.orm import sessionmaker
            import outboxer

            engine = create_engine("postgresql+psycopg://root@127.0.0.1:{closed_port()}/app")
            billing = outboxer.Consumer(
                sessionmaker(engine, class_=outboxer.OutboxSession), name="billing"
            )

            @billing.handler("unreachable.placed", destination="unreachable")
            def charge(event: dict[str, str]) -> None: ...
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOXER_")}
    env["PYTHONPATH"] = str(tmp_path)
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("outboxer-inbox")),
            "unreachable_app:billing",
            "--once",
            "--broker",
            "memory://",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 4, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, done.stderr
    assert "cannot reach the database" in errors[0]
    assert "--db" not in errors[0] and "OUTBOXER_DB" not in errors[0], errors[0]
    assert "unreachable_app:billing" in errors[0], errors[0]


def test_the_name_is_the_inbox_commands_alone() -> None:
    """Run in one process (CliRunner, an application's own tests), outboxer-inbox gives the
    name back when it ends: the other commands' errors still name --db."""
    from click.testing import CliRunner

    from outboxer.cli.inbox import main as inbox_main
    from outboxer.diagnosis import database_setting

    CliRunner().invoke(inbox_main, ["tests.cli_apps:nothing_here", "--broker", "memory://"])
    assert database_setting("probe") == "--db / OUTBOXER_DB"
    database_setting("--db / OUTBOXER_DB")
