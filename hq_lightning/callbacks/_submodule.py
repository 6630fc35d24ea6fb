"""Find and replace a submodule of a LightningModule by dotted attribute path."""

from torch import nn


def _candidates(root: nn.Module, limit: int = 20) -> str:
    names = [name for name, _ in root.named_modules() if name]
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return shown + more if names else "(none: the module has no submodules)"


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """Returns ``root``'s submodule at dotted ``path``, or raises listing the candidates.

    Example:
        >>> root = nn.Module(); root.net = nn.Sequential(nn.Linear(1, 1))
        >>> get_submodule(root, "net.0")
        Linear(in_features=1, out_features=1, bias=True)
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"Expected `submodule` to be a non-empty dotted attribute path, but got {path!r}.")
    module = root
    for depth, part in enumerate(path.split(".")):
        child = getattr(module, part, None) if part in module._modules else None
        if not isinstance(child, nn.Module):
            walked = ".".join(path.split(".")[:depth]) or type(root).__name__
            raise AttributeError(
                f"Expected `submodule={path!r}` to name a submodule of {type(root).__name__}, but "
                f"`{walked}` has no child module `{part}`. Candidates: {_candidates(root)}."
            )
        module = child
    return module


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replaces the submodule at ``path`` by ``new`` (the parent keeps every other child)."""
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(root, parent_path) if parent_path else root
    setattr(parent, name, new)
