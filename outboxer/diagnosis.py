"""What a driver's error means for the operator, decided in one place.

SQLAlchemy, psycopg, PyMySQL, sqlite3, pika and botocore each say "cannot connect",
"wrong password" or "no such table" in their own words. :func:`diagnose` reads an
exception (and its causes) and returns the :class:`~outboxer.errors.OperatorError` it
means, with a one-line message that names the fix, or ``None`` for anything else (a bug,
or a failure the caller handles itself). The original error stays in ``__cause__``.

Drivers are recognised by their exception classes' names, error codes and SQLSTATEs, so
this module imports none of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from sqlalchemy.exc import TimeoutError as PoolTimeout

from .errors import (
    BrokerAccessDenied,
    BrokerUnavailable,
    DatabaseAccessDenied,
    DatabaseUnavailable,
    InvalidURL,
    OperatorError,
)
from .secrets import mask_url
from .store.schema import read_only, tables_missing

__all__ = [
    "AWS_BAD_CREDENTIALS",
    "causes",
    "database_setting",
    "diagnose",
    "refuses_writes",
    "try_again",
]

# PostgreSQL SQLSTATEs.
_PG_AUTH = {"28P01", "28000"}  # invalid_password, invalid_authorization_specification
_PG_NO_DATABASE = "3D000"
_PG_UNDEFINED_TABLE = "42P01"
_PG_CANNOT_CONNECT = {"08001", "08006", "08004", "57P03"}  # ..., cannot_connect_now
_PG_PRIVILEGE = "42501"  # insufficient_privilege
# MySQL/MariaDB error numbers.
_MY_AUTH = {1044, 1045, 1698}
_MY_NO_DATABASE = 1049
_MY_NO_TABLE = 1146
_MY_CANNOT_CONNECT = {2002, 2003, 2005, 2006, 2013}
_MY_PRIVILEGE = {1142, 1143, 1227}  # table, column, global privilege denied
# A server that answers but takes no connection now: shutting down, starting up, in
# recovery, or at its connection limit. PostgreSQL sends these at start-up, where libpq
# keeps no SQLSTATE: its words decide. MariaDB sends the error number.
_PG_NOT_NOW = {"57P01", "57P02", "57P03", "53300"}
# MySQL 3032: offline mode; ProxySQL 9001: no backend server within its connect timeout.
_MY_NOT_NOW = {1040, 1053, 1203, 1927, 3032, 9001}  # too many, shutdown, per-user, killed
# A pooler or proxy in front of the database (PgBouncer, ProxySQL) refuses in its own words
# while the server behind it restarts, or while it is full or shutting down itself.
_NOT_NOW_WORDS = re.compile(
    r"the database system is (?:shutting down|starting up|in recovery mode|"
    r"not yet accepting connections|not accepting connections)|too many clients|"
    r"remaining connection slots are reserved|terminating connection due to administrator "
    r"command|server shutdown in progress|too many connections|max_user_connections|"
    r"pgbouncer cannot connect to server|server login has been failing|"
    r"no more connections allowed|query_wait_timeout|(?:pgbouncer|server) (?:is )?shutting "
    r"down|max connect timeout reached while reaching hostgroup|server is currently in "
    r"offline mode",
    re.IGNORECASE,
)
# A database that refuses writes: PostgreSQL's read_only_sql_transaction; MariaDB/MySQL's
# READ ONLY transaction (1792) and --read-only server (1290, whose number has other uses).
_PG_READ_ONLY = "25006"
_MY_READ_ONLY = 1792
_READ_ONLY_WORDS = re.compile(r"--read-only option|read-only transaction", re.IGNORECASE)
# A statement the database gave up on that succeeds when its transaction runs again, and
# says so ("try restarting transaction"): a deadlock, a lock wait that timed out, a
# serialization failure, a lock NOWAIT / lock_timeout did not get, a server shutting down
# (MariaDB answers 1053 to statements that arrive then). Not a statement timeout or a query
# killed by hand (57014, 1317, 1969, 3024): a message's own work may cause those every time.
_PG_TRY_AGAIN = {"40001", "40P01", "55P03", "57P01", "57P02"}
# 1020: "Record has changed since last read" (innodb_snapshot_isolation, MariaDB 11.6+).
_MY_TRY_AGAIN = {1020, 1053, 1205, 1213}
# PostgreSQL refusing this user or client host (at start-up, where libpq keeps no SQLSTATE).
_REFUSED_LOGIN = re.compile(
    r"no pg_hba\.conf entry|is not permitted to log in|permission denied for database",
    re.IGNORECASE,
)
_DRIVERS = ("sqlalchemy", "psycopg", "psycopg2", "pymysql", "sqlite3", "asyncmy", "aiosqlite")
AWS_BAD_CREDENTIALS = frozenset(
    {
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "InvalidSecurity",
        "ExpiredToken",
        "ExpiredTokenException",
        "MissingAuthenticationToken",
        "InvalidAccessKeyId",
    }
)
"""AWS error codes that mean the credentials were refused (the SQS transport uses them too)."""
_AWS_REFUSED = AWS_BAD_CREDENTIALS | {"AccessDenied", "AccessDeniedException"}
_BACKGROUND = re.compile(r"\s*\(Background on this error at: [^)]*\)")
"""The link SQLAlchemy adds to its errors' text."""
_CONNECT_WORDS = re.compile(
    r"connection refused|could not connect|can't connect|could not translate host name|"
    r"name or service not known|temporary failure in name resolution|timeout expired|"
    r"timed out|no route to host|network is unreachable|server closed the connection|"
    r"connection reset|is the server running",
    re.IGNORECASE,
)
_AUTH_WORDS = re.compile(
    r"password authentication failed|authentication failed|access denied|"
    r"no password supplied|role .* does not exist",
    re.IGNORECASE,
)
_NO_TABLE = re.compile(
    r"no such table: outboxer_|relation \"outboxer_\w+\" does not exist|"
    r"table '[^']*outboxer_\w+' doesn't exist",
    re.IGNORECASE,
)
_NO_DATABASE = re.compile(r"database \"[^\"]*\" does not exist|unknown database", re.IGNORECASE)
# A connection option the driver (libpq) or, at start-up (FATAL), the server refuses.
_BAD_OPTION = re.compile(
    r"invalid connection option|invalid \w+ value:|bad value for|invalid integer value|"
    r"missing \"=\" after|server does not support SSL|"
    r"FATAL:\s+(?:invalid value for parameter|unrecognized configuration parameter)",
    re.IGNORECASE,
)
_OTHER_PROTOCOL = re.compile(
    r"invalid response to SSL negotiation|expected authentication request from server|"
    r"received invalid response|packet sequence number wrong|lost connection to mysql server "
    r"at 'reading initial communication packet'",
    re.IGNORECASE,
)


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what caused it (``__cause__``, ``__context__``, a DBAPI ``orig``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        current = (
            orig if isinstance(orig, BaseException) else (current.__cause__ or current.__context__)
        )


_DB_SETTING = ["--db / OUTBOXER_DB"]
"""Where this process's database URL comes from, as an operator error names it."""


def database_setting(where: str) -> str:
    """Name where this process's database URL comes from, for its operator errors
    (``outboxer-inbox`` has no ``--db``: its URL is the application's engine's); returns
    the name it replaces."""
    previous, _DB_SETTING[0] = _DB_SETTING[0], where
    return previous


def diagnose(
    exc: BaseException, *, db_url: str | None = None, broker_url: str | None = None
) -> OperatorError | None:
    """The operator error ``exc`` means, or ``None``; URLs only appear masked."""
    for error in causes(exc):
        if isinstance(error, OperatorError):
            return error
    for error in causes(exc):
        found = _database(error, db_url) if _from_database(error) else None
        found = found or _rejected_options(error, db_url)
        found = found or (_broker(error, broker_url) if _from_broker(error) else None)
        if found is not None:
            found.__cause__ = exc
            return found
    return None


def refuses_writes(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a database refusing every write: a replica or
    reader endpoint, a read-only session or server. No row is at fault."""
    return any(
        _from_database(error) and _refuses_writes(error, str(error)) for error in causes(exc)
    )


def try_again(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a database saying "try restarting
    transaction": a deadlock, a lock-wait timeout, a serialization failure, a server
    shutting down. The database's trouble, not the statement's: the same work succeeds
    when run again (a handler's run is no failure of the handler, a relay's claim or
    settle is tried again). The transaction was rolled back (a lock-wait timeout on
    MariaDB may roll back the statement only: the caller rolls back the rest)."""
    for error in causes(exc):
        if not _from_database(error):
            continue
        code = error.args[0] if error.args and isinstance(error.args[0], int) else None
        if code in _MY_TRY_AGAIN or getattr(error, "sqlstate", None) in _PG_TRY_AGAIN:
            return True
    return False


def _refuses_writes(error: BaseException, text: str) -> bool:
    """Whether ``error`` (whose driver's message is ``text``) is a database refusing to
    write: a replica or reader endpoint, a read-only session or server."""
    code = error.args[0] if error.args and isinstance(error.args[0], int) else None
    return (
        getattr(error, "sqlstate", None) == _PG_READ_ONLY
        or code == _MY_READ_ONLY
        or bool(_READ_ONLY_WORDS.search(text))
    )


def _from_database(error: BaseException) -> bool:
    module = type(error).__module__
    return module.split(".")[0] in _DRIVERS


def _from_broker(error: BaseException) -> bool:
    module = type(error).__module__
    return module.split(".")[0] in ("pika", "botocore", "boto3") or isinstance(
        error, (ConnectionError, TimeoutError)
    )


def _shown(url: str | None) -> str:
    return mask_url(url) if url else "URL"


def _database(error: BaseException, url: str | None) -> OperatorError | None:
    where = _shown(url)
    sqlstate = getattr(error, "sqlstate", None)
    code = error.args[0] if error.args and isinstance(error.args[0], int) else None
    # SQLAlchemy's error shows the statement and its parameters (an application's engine
    # may show row values): only the driver's own message says what the database meant.
    orig = getattr(error, "orig", None)
    text = str(orig if isinstance(orig, BaseException) else error)
    if isinstance(error, PoolTimeout):
        limit = _BACKGROUND.sub("", text)
        return DatabaseUnavailable(
            f"every connection of the engine's pool is in use ({_detail(limit)}), so the "
            "database was not asked: raise the engine's pool_size or max_overflow (a "
            "consumer takes one per worker), or give outboxer an engine of its own"
        )
    if type(error).__name__ == "ArgumentError" and "URL" in text:
        return InvalidURL(f"not a database URL: {where}; use dialect+driver://user@host/db")
    if sqlstate == _PG_NO_DATABASE or code == _MY_NO_DATABASE or _NO_DATABASE.search(text):
        return DatabaseUnavailable(
            f"the database in {where} does not exist: create it, or fix {_DB_SETTING[0]}"
        )
    if sqlstate == _PG_UNDEFINED_TABLE or code == _MY_NO_TABLE or _NO_TABLE.search(text):
        if "outboxer_" not in text:
            return None  # someone else's table
        return tables_missing(url)
    if sqlstate == _PG_PRIVILEGE or code in _MY_PRIVILEGE:
        return DatabaseAccessDenied(
            f"the database user of {where} lacks privileges ({_detail(text)}): grant it "
            "privileges on outboxer's tables and their schema, or use the user that owns them"
        )
    if _BAD_OPTION.search(text):
        return InvalidURL(
            f"cannot connect with the options of {where} ({_detail(text)}): fix the URL's "
            f"query (?sslmode=..., ?connect_timeout=...) in {_DB_SETTING[0]}"
        )
    if _OTHER_PROTOCOL.search(text):
        return DatabaseUnavailable(
            f"what answers at {where} is not that database ({_detail(text)}): is the port "
            f"in {_DB_SETTING[0]} the database's?"
        )
    if _REFUSED_LOGIN.search(text):
        return DatabaseAccessDenied(
            f"the database at {where} refuses this user or client host ({_detail(text)}): "
            "allow them (pg_hba.conf, LOGIN, GRANT CONNECT), or use another user in "
            f"{_DB_SETTING[0]}"
        )
    if _refuses_writes(error, text):
        # Waitable: a relay left on a failed-over primary, or on an endpoint that moves
        # back, goes on once it takes writes again.
        return read_only(url, _detail(text))
    if sqlstate in _PG_NOT_NOW or code in _MY_NOT_NOW or _NOT_NOW_WORDS.search(text):
        return DatabaseUnavailable(
            f"the database at {where} takes no connections now ({_detail(text)}): wait for "
            "it to finish restarting or recovering, or raise its connection limit"
        )
    if sqlstate in _PG_AUTH or code in _MY_AUTH or _AUTH_WORDS.search(text):
        return DatabaseAccessDenied(
            f"the database refused the credentials for {where}: check the user and password "
            f"in {_DB_SETTING[0]}"
        )
    if "unable to open database file" in text:
        return DatabaseUnavailable(
            f"cannot open the SQLite database file of {where}: does its directory exist, "
            "and may this user write there?"
        )
    if sqlstate in _PG_CANNOT_CONNECT or code in _MY_CANNOT_CONNECT or _CONNECT_WORDS.search(text):
        return DatabaseUnavailable(
            f"cannot reach the database at {where}: is it running, and are the host and port "
            f"in {_DB_SETTING[0]} right?"
        )
    return None


def _detail(text: str) -> str:
    """The driver's own words, short: its message's first line, from where it says what
    failed ("... failed: server does not support SSL, but SSL was required")."""
    first = re.sub(r"^\([\w.]+\)\s*", "", text.strip().splitlines()[0] if text.strip() else "")
    first = first.rsplit(" failed: ", 1)[-1]
    return first if len(first) <= 160 else first[:157] + "..."


def _rejected_options(error: BaseException, url: str | None) -> OperatorError | None:
    """A driver that fails on a connection option it cannot use without saying so (PyMySQL
    on an unknown ``?charset=``: an AttributeError) fails inside the DBAPI's ``connect()``:
    the URL's query is the only input there."""
    if not isinstance(error, (AttributeError, KeyError, LookupError, TypeError, ValueError)):
        return None
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    if not frames or str(frames[-1].f_globals.get("__name__", "")).split(".")[0] not in _DRIVERS:
        return None
    if not any(
        frame.f_code.co_name == "connect"
        and frame.f_globals.get("__name__") == "sqlalchemy.engine.default"
        for frame in frames
    ):
        return None
    return InvalidURL(
        f"the database driver cannot use the connection options of {_shown(url)} "
        f"({type(error).__name__}: {_detail(str(error))}): fix the URL's query in "
        f"{_DB_SETTING[0]}"
    )


def _broker(error: BaseException, url: str | None) -> OperatorError | None:
    where = _shown(url)
    name = type(error).__name__
    response = getattr(error, "response", None)
    aws_code = ""
    if isinstance(response, dict):
        aws_code = str(response.get("Error", {}).get("Code", ""))
    if name in ("ProbableAuthenticationError", "AuthenticationError") or aws_code in _AWS_REFUSED:
        return BrokerAccessDenied(
            f"the broker refused the credentials for {where}: check the user and password "
            "in --broker / OUTBOXER_BROKER"
        )
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return BrokerAccessDenied(
            "no usable AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE) in the environment"
        )
    if name == "ProbableAccessDeniedError":
        return BrokerAccessDenied(
            f"the broker refused access to the virtual host of {where}: grant the user "
            "permissions on it, or fix the vhost in --broker / OUTBOXER_BROKER"
        )
    if name == "NoRegionError":
        return InvalidURL(f"no AWS region for {where}: add ?region=... to the sqs:// or sns:// URL")
    if name in (
        "AMQPConnectionError",
        "ConnectionClosed",
        "StreamLostError",
        "IncompatibleProtocolError",
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ConnectionClosedError",
    ) or isinstance(error, (ConnectionError, TimeoutError)):
        kwargs = getattr(error, "kwargs", None)
        endpoint = kwargs.get("endpoint_url") if isinstance(kwargs, dict) else None
        if endpoint or type(error).__module__.startswith("botocore"):
            # An sqs:// or sns:// URL names no host or port: the region (or endpoint_url)
            # chooses the endpoint.
            return BrokerUnavailable(
                f"cannot reach the broker at {where} (endpoint {endpoint or 'unknown'}): are "
                "?region= (an AWS region, e.g. eu-west-1) and ?endpoint_url= in --broker / "
                "OUTBOXER_BROKER right, and is the endpoint reachable from here?"
            )
        return BrokerUnavailable(
            f"cannot reach the broker at {where}: is it running, and are the host and port "
            "in --broker / OUTBOXER_BROKER right?"
        )
    return None
