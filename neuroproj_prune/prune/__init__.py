"""The `prune` stage. Read in this order: `api.prune_layers` (the one per-layer loop: select → fold → slice),
`calibrate` (the pipeline that hands it each layer's moments), `measure` (what a layer's forward accumulates),
`select` (SELECTORS), `fold` (FOLDS), `allocate` (ALLOCATIONS), `config` (PruneConfig); then the optional steps
(`swaps`, `reconstruct`, `search`), layer streaming (`offload`) and the plan file (`plan_file`)."""
from .allocate import ALLOCATIONS
from .api import apply_plan, plan, prune, prune_layers
from .calibrate import CALIBRATIONS
from .config import PruneConfig
from .fold import FOLDS
from .measure import TARGETS, WEIGHTINGS
from .offload import OFFLOADS
from .plan_file import Plan
from .reconstruct import RECONSTRUCT_SCOPES
from .select import SELECTORS

__all__ = ["ALLOCATIONS", "CALIBRATIONS", "FOLDS", "OFFLOADS", "Plan", "PruneConfig", "RECONSTRUCT_SCOPES",
           "SELECTORS", "TARGETS", "WEIGHTINGS", "apply_plan", "plan", "prune", "prune_layers"]
