"""The commit rule as a policy option (``Dwell-Jing/commit-forcing``, docs/methods.md): its validation, what it reads
for each policy, and the ``commit_rule=`` keyword every :class:`~deepforcing_kernels.CachePolicy` constructor takes.

The option is data on the policy (``CachePolicy.commit_rule``); the cache acts on it (:mod:`.cache.commit`). It lives
here, beside the policy, so that the policy module stays about what each policy keeps.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, Optional, Union

from ._scalars import check_int

__all__ = ["check_commit_rule", "commit_frames", "commit_from_frames", "take_commit_rule_keyword"]

CommitRule = Union[None, bool, int]


def check_commit_rule(policy: Any) -> None:
    """Normalise ``policy.commit_rule`` in place: None / False (stored as None), True (not for ``full``: it has no
    window to read), or an int of at least one block (the clean pass reads its own block whole)."""
    r = policy.commit_rule
    if r is None or r is False:
        object.__setattr__(policy, "commit_rule", None)
        return
    if r is True:
        if policy.kind == "full":
            raise ValueError("commit_rule=True reads the policy's window, and 'full' has none: give a number "
                             "of frames")
        return
    N = check_int("commit_rule", r, minimum=1)
    object.__setattr__(policy, "commit_rule", N)
    if N < policy.block_frames:
        raise ValueError(f"commit_rule={N} frames must hold the clean pass's own block ({policy.block_frames} frames)")


def commit_frames(policy: Any) -> Optional[int]:
    """Frames the clean pass reads under the rule (None: off): an int as given; for True the authors' choice,
    ``recent_frames`` for ``tethercache`` (their integration reads its recent region), else ``window_frames``."""
    r = policy.commit_rule
    if r is True:
        return policy.recent_frames if policy.kind == "tethercache" else policy.window_frames
    return r


def commit_from_frames(policy: Any) -> int:
    """Frames the stream must have produced (this block's included) before the rule applies: the window for
    ``tethercache`` (the authors switch once its cache is full), else 0 (every clean pass)."""
    return policy.window_frames if policy.kind == "tethercache" and policy.commit_rule is not None else 0


def _taking(ctor: classmethod) -> classmethod:
    fn = ctor.__func__

    @functools.wraps(fn)
    def build(cls, *args: Any, commit_rule: CommitRule = None, **kwargs: Any) -> Any:
        policy = fn(cls, *args, **kwargs)
        return policy if commit_rule is None or commit_rule is False else replace(policy, commit_rule=commit_rule)

    return classmethod(build)


def take_commit_rule_keyword(cls: type) -> None:
    """Give every public constructor (classmethod) of ``cls`` but ``from_dict`` a ``commit_rule=`` keyword: the
    rule is an option of every policy (``CachePolicy.rolling_sink(commit_rule=True)``), so no constructor spells
    it out (one a later method adds gets it too)."""
    for name, attr in list(vars(cls).items()):
        if isinstance(attr, classmethod) and not name.startswith("_") and name != "from_dict":
            setattr(cls, name, _taking(attr))
