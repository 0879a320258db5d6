"""The registry of model variants (:class:`rooflab.model.terms.Variant`): rooflab's corrected roofline and
BLIS's trained-physics basis (:mod:`rooflab.model.blis`).

``roofline7`` is exactly docs/spec.md §1; ``roofline7+layers`` adds a per-layer overhead term β_L·L, which the
seed folded into β7 and which cross-model transfer may need.
"""

from __future__ import annotations

from rooflab.errors import InputError
from rooflab.model.blis import BLIS_BASIS_COLUMNS, BLIS_EXTENSION_COLUMNS, BLIS_VARIANTS
from rooflab.model.features import BASIS_COLUMNS, FORMULAS
from rooflab.model.terms import Term, Variant

ROOFLINE7 = (
    Term("beta1", "f_prefill", "prefill roofline max(F_pf_compute, F_pf_kv)", "×", prior=1.0),
    Term("beta2", "f_decode", "decode roofline max(F_dc_compute, F_dc_kv)", "×", prior=1.0),
    Term("beta3", "f_weight_static", "static weight loading", "×", prior=1.0),
    Term("beta4", "f_weight_moe", "routed-expert weight loading", "×", prior=1.0),
    Term("beta5", "f_tp", "TP all-reduce", "×", prior=1.0),
    Term("beta6", "n_requests", "per-request overhead", "µs/request"),
    Term("beta7", "one", "per-step overhead", "µs/step"),
)

VARIANTS = {
    "roofline7": Variant("roofline7", ROOFLINE7),
    "roofline7+layers": Variant("roofline7+layers", ROOFLINE7 + (
        Term("beta_layer", "n_layers", "per-layer overhead (launches, norms)", "µs/layer"),)),
    # The prefill roofline split at its attention-score share, each with its own efficiency: FlashAttention's
    # achieved FLOP rate differs from the GEMMs' and grows with context, so long-prompt setups the data never
    # showed need their own β (issue 15). With beta1_attn = beta1 it is roofline7+layers exactly.
    "roofline7+layers+attn": Variant("roofline7+layers+attn", (
        Term("beta1", "f_pf_dense", "prefill roofline less its attention-score share", "×", prior=1.0),
        # FlashAttention runs at 0.1-60% of the bf16 peak depending on chunk and context (measured on an H200,
        # benchmarks/results/gpu-prefill-kernels-h200.csv: median 25%): its visibility is judged at β = 4 and
        # the stop rule accepts [0.3, 50]; GEMMs reach 70-75%, hence [0.3, 5] for the others
        Term("beta1_attn", "f_pf_attn", "prefill attention scores (QKᵀ, PV) at the bf16 peak", "×", prior=1.0,
             typical=4.0, plausible=(0.3, 50.0)),
        *ROOFLINE7[1:],
        Term("beta_layer", "n_layers", "per-layer overhead (launches, norms)", "µs/layer"))),
    **BLIS_VARIANTS,  # BLIS's trained-physics basis, 10 and 11 coefficients (formulas "blis")
}
DEFAULT_VARIANT = "roofline7+layers"  # what campaigns, replay and `rooflab fit` use unless told otherwise
assert all(t.feature in (BASIS_COLUMNS if v.formulas != ("blis",) else BLIS_BASIS_COLUMNS + BLIS_EXTENSION_COLUMNS)
           for v in VARIANTS.values() for t in v.terms)
assert all(f in FORMULAS for v in VARIANTS.values() for f in v.formulas)


def get_variant(name: str | Variant) -> Variant:
    if isinstance(name, Variant):
        return name
    if name not in VARIANTS:
        raise InputError(None, "variant", f"unknown model variant {name!r} (known: {', '.join(VARIANTS)})")
    return VARIANTS[name]


def resolve_formulas(variant: str | Variant, formulas: str | None) -> str:
    """The feature formulas a fit of ``variant`` uses: ``formulas`` when given (it must be one the variant's
    columns come from), else the variant's own default (``vllm`` for rooflab's variants, ``blis`` for BLIS's)."""
    v = get_variant(variant)
    if formulas is None:
        return v.default_formulas
    if formulas not in v.formulas:
        raise InputError(None, "formulas", f"variant {v.name} uses the {' or '.join(v.formulas)} formulas, "
                         f"not {formulas!r}")
    return formulas
