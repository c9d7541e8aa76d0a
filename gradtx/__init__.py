"""gradtx: composable, pure gradient transformations for JAX.

An optimizer is a value ``tx`` with ``tx.init(params)`` and ``tx.update(grads, state, params)``;
every optimizer is a short chain of public primitives. See the README for a tour.
"""

from gradtx import masks, numerics, schedules, tree
from gradtx.base import (EmptyState, Transform, apply_updates, hyperparameter, identity, option,
                         set_to_zero, stateless, transform)
from gradtx.combine import (MaskedNode, MaskedState, PartitionState, chain, masked, named_chain,
                            partition)
from gradtx.tree import TreeMismatchError
from gradtx.transforms.scaling import (ScheduleState, scale, scale_by_learning_rate,
                                       scale_by_schedule)
from gradtx.transforms.momentum import *  # noqa: F401,F403  (explicit list assembled at release)
from gradtx.transforms.sign import *  # noqa: F401,F403
from gradtx.transforms.decay import *  # noqa: F401,F403
from gradtx.transforms.clipping import *  # noqa: F401,F403
from gradtx.transforms.trust_ratio import *  # noqa: F401,F403
from gradtx.transforms.adaptive import *  # noqa: F401,F403
from gradtx.transforms.adam import *  # noqa: F401,F403
from gradtx.transforms.factored import *  # noqa: F401,F403
from gradtx.transforms.plateau import *  # noqa: F401,F403
from gradtx.wrappers import *  # noqa: F401,F403
from gradtx.optimizers import *  # noqa: F401,F403
from gradtx.porting import *  # noqa: F401,F403

__version__ = "0.1.0"
