"""What the sparse modules' own load_state_dict shares: they hold no submodules, so every key under
their prefix is theirs."""

from __future__ import annotations


def unexpected_of(state_dict: dict, prefix: str, known: list[str]) -> list[str]:
    """The keys under `prefix` that name nothing the module holds (strict loading reports them)."""
    return [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in known]
