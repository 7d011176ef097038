"""Studies: small, exactly solvable problems that test the project's methods against their theory.

  router_gradients.py  router-gradient estimators (SparseMixer-v2 as shipped, v2* as intended, GShard top-k softmax,
                       straight-through Gumbel-softmax, REINFORCE) against exact gradients computed by enumeration
                       (docs/router_gradients.md; tables in experiments/estimators/).

Submodules are not imported eagerly (`from grin_jax.studies import router_gradients`).
"""
