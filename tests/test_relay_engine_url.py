"""The relay's engine keeps what the operator's URL says.

``relay_engine`` adds its own libpq settings (``options=-c synchronous_commit=off``,
keepalives, ``tcp_user_timeout``) as connect arguments, and those replaced the URL's own:
a relay given ``?options=-csearch_path%3Dapp`` (docs/migrations.md: outboxer's tables in a
schema other than public) looked for its tables in ``public`` and exited "tables missing";
with a copy of the tables in ``public`` it would relay the wrong outbox. Any other setting
in ``options`` (``statement_timeout``, ``default_transaction_read_only``) was dropped too.
"""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.relay import relay_engine

from .test_cli_failures import as_process

SCHEMA_OPTIONS = "options=-csearch_path%3Dapp"


def _setting(url: str, name: str) -> str:
    engine = relay_engine(url)
    try:
        with engine.connect() as connection:
            return str(connection.execute(text(f"SHOW {name}")).scalar())
    finally:
        engine.dispose()


def test_the_urls_options_are_kept_beside_the_relays_own(pg_url: str) -> None:
    url = f"{pg_url}?options=-csearch_path%3Dapp%20-cstatement_timeout%3D7s"
    assert _setting(url, "search_path") == "app"
    assert _setting(url, "statement_timeout") == "7s"
    assert _setting(url, "synchronous_commit") == "off"  # still the relay's own


def test_a_setting_the_url_gives_wins_over_the_relays(pg_url: str) -> None:
    """The operator's choice: a URL that asks for synchronous commits gets them."""
    assert _setting(f"{pg_url}?options=-csynchronous_commit%3Don", "synchronous_commit") == "on"
    engine = relay_engine(f"{pg_url}?keepalives_idle=77")
    try:
        with engine.connect() as connection:
            dbapi = connection.connection.dbapi_connection
            assert dbapi is not None
            parameters = dbapi.info.get_parameters()  # type: ignore[attr-defined]
    finally:
        engine.dispose()
    assert parameters["keepalives_idle"] == "77"  # the relay's own would be 10
    assert parameters["keepalives_count"] == "3"  # the relay's, where the URL says nothing


def test_a_relay_on_tables_in_another_schema_sends_their_messages(pg_url: str) -> None:
    admin = create_engine(pg_url)
    with admin.begin() as connection:
        connection.execute(text("CREATE SCHEMA app"))
    admin.dispose()
    url = f"{pg_url}?{SCHEMA_OPTIONS}"
    assert as_process("db", "upgrade", env={"OUTBOXER_DB": url}).returncode == 0
    engine = create_engine(url)
    with sessionmaker(engine, class_=outboxer.OutboxSession).begin() as session:
        session.publish({"n": 1}, type="test.schema", destination="orders")
    result = as_process(
        "relay", "--once", env={"OUTBOXER_DB": url, "OUTBOXER_BROKER": "memory://?discard=true"}
    )
    assert result.returncode == 0, result.stderr
    assert "1 sent" in result.stderr, result.stderr
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM app.outboxer_outbox")).scalar() == 0
    engine.dispose()
