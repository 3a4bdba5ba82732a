"""Which mode a W&B run starts in, decided from `logger.wandb.mode`, the environment and the
credentials W&B would find. Checked with the command line (`validate`), before anything is
built, and again when the loggers open: `online` without credentials is one line either way."""

from __future__ import annotations

import netrc
import os
import urllib.parse
from typing import Literal, cast

from vitexp.errors import ConfigError

WANDB_MODES = ("auto", "online", "offline", "disabled")
# What WANDB_MODE may also say (wandb's older names).
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}


def wandb_credentials() -> bool:
    """Whether W&B has an API key to log in with: WANDB_API_KEY (or an identity token file),
    or a netrc entry (`wandb login` writes one) for the W&B server."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base = os.environ.get("WANDB_BASE_URL")
    if base:
        hosts = [urllib.parse.urlsplit(base).netloc]
    else:
        import wandb

        hosts = ["api.wandb.ai", urllib.parse.urlsplit(wandb.Settings().base_url).netloc]
    try:
        entries = netrc.netrc(os.environ.get("NETRC") or None)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any(entries.authenticators(host) is not None for host in hosts)


def wandb_mode(mode: str) -> Literal["online", "offline", "disabled"]:
    """The mode a W&B run starts in: `mode` (`logger.wandb.mode`), unless WANDB_MODE in the
    environment says otherwise, as W&B users expect; `auto` is online when credentials exist,
    else offline. A ConfigError in one line for an unknown mode, or `online` without
    credentials (which W&B would report as a traceback once the run has started)."""
    env = os.environ.get("WANDB_MODE")
    said = f"WANDB_MODE={env} (in the environment)" if env else f"logger.wandb.mode={mode}"
    chosen = _MODE_ALIASES.get(env or mode, env or mode)
    if chosen not in WANDB_MODES:
        raise ConfigError(f"{said} is not a W&B mode: use one of {', '.join(WANDB_MODES)}")
    if chosen == "auto":
        return "online" if wandb_credentials() else "offline"
    if chosen == "online" and not wandb_credentials():
        instead = "unset WANDB_MODE" if env else "set logger.wandb.mode=offline (or auto)"
        raise ConfigError(
            f"{said} needs W&B credentials and none are set: run `wandb login`, set WANDB_API_KEY, "
            f"or {instead} to log offline and `wandb sync` later"
        )
    return cast(Literal["online", "offline", "disabled"], chosen)
