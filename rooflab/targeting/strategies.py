"""Targeting strategies behind one interface, the :class:`Targeting` protocol the campaign loop calls
(:mod:`rooflab.campaign.loop`): ``d-optimal`` (:mod:`rooflab.targeting.doptimal`, the default), ``menu``
(:mod:`rooflab.targeting.menu`), ``random`` (a seeded random order of the candidates, the benchmark's baseline)
and ``static`` (the whole static99 plan at once, the benchmark's reference)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rooflab.collect.spec import Campaign, static99
from rooflab.errors import InputError
from rooflab.fit.calibration import Calibration
from rooflab.targeting.candidates import Pick, describe
from rooflab.targeting.doptimal import choose_next_doptimal
from rooflab.targeting.menu import choose_next

TARGETING = ("d-optimal", "menu", "random", "static")


@dataclass(frozen=True)
class Spend:
    """GPU-seconds spent so far, per split."""

    train_s: float = 0.0
    validation_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.train_s + self.validation_s


class Targeting(Protocol):
    """Picks the next batch of sweep points. ``calib`` is None before the first fit (the bootstrap);
    ``collected``: keys of points already collected (never picked again); ``budget_left_s``: None = unlimited."""

    name: str

    def pick(self, calib: Calibration | None, campaign: Campaign, collected: set[str], *, batch_size: int,
             budget_left_s: float | None, iteration: int, spend: Spend) -> list[Pick]: ...


@dataclass
class DOptimal:
    name: str = "d-optimal"

    def pick(self, calib: Calibration | None, campaign: Campaign, collected: set[str], *, batch_size: int,
             budget_left_s: float | None, iteration: int, spend: Spend) -> list[Pick]:
        return choose_next_doptimal(calib, campaign, collected, batch_size=batch_size,
                                    budget_gpu_seconds_left=budget_left_s, variant=campaign.loop.variant,
                                    formulas=campaign.loop.formulas, heldout_gpu_s=spend.validation_s,
                                    train_gpu_s=spend.train_s)


@dataclass
class Menu:
    name: str = "menu"

    def pick(self, calib: Calibration | None, campaign: Campaign, collected: set[str], *, batch_size: int,
             budget_left_s: float | None, iteration: int, spend: Spend) -> list[Pick]:
        return choose_next(calib, campaign, collected, batch_size=batch_size, budget_gpu_seconds_left=budget_left_s,
                           iteration=iteration)


@dataclass
class RandomOrder:
    """The candidates in one seeded random order; each batch takes the next ones not yet collected that fit the
    budget left."""

    seed: int = 0
    name: str = "random"
    _order: list[int] | None = field(default=None, repr=False)

    def pick(self, calib: Calibration | None, campaign: Campaign, collected: set[str], *, batch_size: int,
             budget_left_s: float | None, iteration: int, spend: Spend) -> list[Pick]:
        cands = campaign.candidates()
        if self._order is None:
            self._order = [int(i) for i in np.random.default_rng(1000 + self.seed).permutation(len(cands))]
        left = math.inf if budget_left_s is None else budget_left_s
        out: list[Pick] = []
        while self._order and len(out) < batch_size:
            p = cands[self._order.pop(0)]
            cost = campaign.gpu_seconds([p]) * max(1, campaign.replicates)
            if p.key in collected or cost > left:
                continue
            out.append(Pick(p, f"random order: {describe(p)}", "random", cost, 0.0))
            left -= cost
        return out


@dataclass
class StaticPlan:
    """The static 99-run plan (docs/spec.md §3) in one batch; nothing after it."""

    name: str = "static"

    def pick(self, calib: Calibration | None, campaign: Campaign, collected: set[str], *, batch_size: int,
             budget_left_s: float | None, iteration: int, spend: Spend) -> list[Pick]:
        if iteration > 0:
            return []
        return [Pick(p, f"static plan: {describe(p)}", "static", campaign.gpu_seconds([p]), 0.0)
                for p in static99(campaign) if p.key not in collected]


def make_targeting(name: str, *, seed: int = 0) -> Targeting:
    if name == "d-optimal":
        return DOptimal()
    if name == "menu":
        return Menu()
    if name == "random":
        return RandomOrder(seed)
    if name == "static":
        return StaticPlan()
    raise InputError(None, "targeting", f"unknown targeting {name!r} (known: {', '.join(TARGETING)})")
