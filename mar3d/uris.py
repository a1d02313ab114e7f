"""Model URIs the system accepts: registry and run URIs of a known shape, or a local
model folder. Kept apart from :mod:`mar3d.registry` so that code which only checks a URI
(the weight format, inference entry points) does not import MLflow."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}"
MODELS_URI = re.compile(rf"^models:/(?P<name>{NAME})(?:@(?P<alias>{NAME})|/(?P<version>[0-9]{{1,9}}))$")
RUNS_URI = re.compile(r"^runs:/(?P<run_id>[0-9a-f]{32})/(?P<path>[A-Za-z0-9_.\-/]{1,256})$")


def validate_model_uri(uri: str) -> str:
    """Accept only registry/run URIs of a known shape or an existing local directory."""
    if not isinstance(uri, str) or not uri:
        raise ValueError("model URI must be a non-empty string")
    if MODELS_URI.match(uri) or RUNS_URI.match(uri):
        if ".." in uri.split("/"):
            raise ValueError(f"model URI {uri!r} may not contain '..'")
        return uri
    if "://" in uri or uri.startswith(("models:", "runs:")):
        raise ValueError(f"model URI {uri!r} is not models:/NAME@ALIAS, models:/NAME/VERSION, "
                         "runs:/RUN_ID/PATH or a local directory")
    path = Path(uri)
    if not path.is_dir():
        raise ValueError(f"model directory {uri!r} does not exist")
    return str(path.resolve())


def redact_credentials(uri: str) -> str:
    """``uri`` with any user and password of its authority replaced by ``***``
    (``http://user:pass@host`` -> ``http://***@host``), for messages and logs."""
    text = str(uri)
    if "://" not in text:
        return text
    scheme, rest = text.split("://", 1)
    authority, sep, tail = rest.partition("/")
    if "@" not in authority:
        return text
    return f"{scheme}://***@{authority.rsplit('@', 1)[1]}{sep}{tail}"


def refuse_credentials(uri: str, what: str, instead: str, error: type[Exception] = ValueError) -> str:
    """``uri`` unchanged, or ``error`` when it embeds a user or password: a URI is
    printed, logged and recorded as a parameter, a secret must not be. ``instead`` says
    where the credentials belong."""
    text = str(uri)
    if "://" in text:
        try:
            parts = urlsplit(text)
            embedded = parts.username is not None or parts.password is not None
        except ValueError:
            embedded = "@" in text.split("://", 1)[1].partition("/")[0]
        if embedded:
            raise error(f"{what} {redact_credentials(text)} embeds credentials in the URI, where "
                        f"they would be printed and logged; {instead}")
    return text
