"""Where the shipped tiny checkpoints live, and how a name or a folder resolves to a model."""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "checkpoints"


def shipped_names() -> list[str]:
    """The names of the shipped checkpoints, sorted."""
    return sorted(p.name for p in SHIPPED.glob("*") if (p / "config.json").is_file())


def resolve_model(name_or_path: str | Path) -> Path:
    """A model folder as given, else a shipped checkpoint's name (tiny-m3, tiny-mqt)."""
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    shipped = SHIPPED / str(name_or_path)
    if (shipped / "config.json").is_file():
        return shipped
    raise FileNotFoundError(
        f"no model {str(name_or_path)!r}: not a model folder (config.json is missing) nor a "
        f"shipped checkpoint ({', '.join(shipped_names())})"
    )
