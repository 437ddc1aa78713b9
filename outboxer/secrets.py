"""Keeping credentials out of logs, messages and ``status`` output.

:func:`mask_url` is the one function every printed database or broker URL goes through.
It masks what a URL can carry as a secret, in every form seen in practice:

* the password of the userinfo (``amqp://user:secret@host``), also when it holds an
  unencoded ``/``, ``#``, ``?`` or ``@`` that breaks URL parsing (everything between the
  scheme and the last ``@`` after the user name is masked);
* query parameters whose name says secret: ``password``, ``secret``, ``token``, ``key``
  and the like (``?password=``, ``aws_secret_access_key=``, ``sslpassword=``...).

It never raises, whatever it is given.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "mask_url", "unencoded_credentials"]

MASK = "***"

_SECRET_PARAMETER = re.compile(
    r"(?P<name>[?&;][^=&;#]*(?:pass|pwd|secret|token|key|credential|signature|auth)"
    r"[^=&;#]*=)(?P<value>[^&;#]*)",
    re.IGNORECASE,
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def mask_url(url: str) -> str:
    """``url`` with its password and secret query parameters replaced by ``***``."""
    text = str(url)
    scheme = _SCHEME.match(text)
    start = scheme.end() if scheme else 0
    rest = text[start:]
    end = _userinfo_end(rest)
    if end >= 0:
        user = re.split(r"[:/?#]", rest, maxsplit=1)[0]
        rest = f"{user}:{MASK}{rest[end:]}"
    masked = text[:start] + rest
    return _SECRET_PARAMETER.sub(lambda m: m.group("name") + MASK, masked)


def unencoded_credentials(url: str) -> bool:
    """Whether ``url``'s password holds a ``/``, ``?``, ``#`` or ``@`` that URL parsers take
    for the end of the host: they then report part of the password as the host or port (and
    print it in their errors)."""
    text = str(url)
    scheme = _SCHEME.match(text)
    rest = text[scheme.end() if scheme else 0 :]
    end = _userinfo_end(rest)
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    return end >= 0 and authority.rfind("@") != end


def _userinfo_end(rest: str) -> int:
    """Where the password-holding userinfo of ``rest`` (a URL after ``scheme://``) ends: at
    its last ``@``, or -1 when nothing before that ``@`` holds a ``:``.

    A password may hold ``/``, ``?``, ``#`` or ``@`` unencoded, so nothing up to the last
    ``@`` is trusted to be anything but secret. That masks too much in the rare URL whose
    query holds an ``@`` after a port; masking too much is harmless, printing part of a
    password is not.
    """
    last = rest.rfind("@")
    if last < 0 or ":" not in rest[:last]:
        return -1
    return last
