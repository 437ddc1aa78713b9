"""mask_url: no form of URL credential survives into what outboxer prints."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outboxer.secrets import mask_url, unencoded_credentials


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("postgresql+psycopg://app@db/app", "postgresql+psycopg://app@db/app"),
        ("postgresql://user:pa/ss#word@host/db", "postgresql://user:***@host/db"),
        (
            "postgresql://u@h/db?password=s3cret&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        ("sqs://KEY:SEC/RET@?region=eu-west-1", "sqs://KEY:***@?region=eu-west-1"),
        (
            "sqs://?aws_secret_access_key=abc&aws_session_token=t",
            "sqs://?aws_secret_access_key=***&aws_session_token=***",
        ),
        (
            "mysql+pymysql://root:p%40ss@h/db?sslpassword=x;token=y",
            "mysql+pymysql://root:***@h/db?sslpassword=***;token=***",
        ),
        ("amqp://h/vhost?email=a@b", "amqp://h/vhost?email=a@b"),
        ("amqp://h:5672/vhost?email=a@b", "amqp://h:***@b"),  # too much, never too little
        ("amqp://u:p@ss@h/", "amqp://u:***@h/"),
        ("", ""),
        ("memory://", "memory://"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


SECRET = st.text(alphabet="XYZqwk/#?:@%!&=", min_size=6, max_size=20).filter(
    lambda s: any(c in s for c in "/#?@") and s.strip("XYZqwk")
)


@given(password=SECRET, scheme=st.sampled_from(["amqp", "postgresql+psycopg", "mysql", "sqs"]))
def test_no_password_survives_masking(password: str, scheme: str) -> None:
    url = f"{scheme}://user:{password}@host.example:1234/db"
    assert password not in mask_url(url)


@given(st.text(max_size=60))
def test_mask_url_never_raises(text: str) -> None:
    assert isinstance(mask_url(text), str)
    assert isinstance(unencoded_credentials(text), bool)


@given(value=st.text(alphabet="abc123XYZ-_.", min_size=4, max_size=20))
def test_secret_query_parameters_are_masked(value: str) -> None:
    for name in ("password", "aws_secret_access_key", "token", "api_key", "sslpassword"):
        url = f"postgresql://u@h/db?sslmode=require&{name}={value}"
        assert f"{name}={value}" not in mask_url(url)
