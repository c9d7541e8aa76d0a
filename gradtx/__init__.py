"""gradtx: composable, pure gradient transformations for JAX.

An optimizer is a value ``tx`` with ``tx.init(params)`` and ``tx.update(grads, state, params)``;
every optimizer is a short chain of public primitives. See the README for a tour.
"""

from gradtx import masks, numerics, schedules, sharding, tree
from gradtx.base import (EmptyState, Transform, apply_updates, hyperparameter, identity, option,
                         set_to_zero, stateless, transform)
from gradtx.combine import (MaskedNode, MaskedState, PartitionState, chain, masked, named_chain,
                            partition)
from gradtx.tree import TreeMismatchError
from gradtx.transforms.scaling import (ScheduleState, scale, scale_by_learning_rate,
                                       scale_by_schedule)
from gradtx.transforms.momentum import (EmaState, TraceState, ema, trace)
from gradtx.transforms.sign import (ScaleByLionState, scale_by_lion, scale_by_sign)
from gradtx.transforms.decay import (DecayState, add_decoupled_weight_decay)
from gradtx.transforms.clipping import (adaptive_grad_clip, clip, clip_by_block_rms,
                                        clip_by_global_norm)
from gradtx.transforms.trust_ratio import scale_by_trust_ratio
from gradtx.transforms.adaptive import (ScaleByAdadeltaState, ScaleByRmsState, ScaleByRssState,
                                        ScaleByStddevState, scale_by_adadelta, scale_by_rms,
                                        scale_by_rss, scale_by_stddev)
from gradtx.transforms.adam import (ScaleByAdamState, ScaleByAdamaxState, ScaleByBeliefState,
                                    ScaleByRadamState, scale_by_adam, scale_by_adamax,
                                    scale_by_belief, scale_by_radam)
from gradtx.transforms.factored import (ScaleByFactoredRmsState, scale_by_factored_rms,
                                        scale_by_param_block_rms)
from gradtx.transforms.plateau import (ReduceOnPlateauState, reduce_on_plateau)
from gradtx.wrappers import (AccumulateGradientsState, EmaParamsState, FreezeState,
                             InjectHyperparamsState, LookaheadState, SkipNonfiniteState, SwaState,
                             SwitchState, accumulate_gradients, averaged_params,
                             current_hyperparams, ema_params, freeze, inject_hyperparams,
                             lookahead, set_hyperparam, skip_nonfinite, swa, switch)
from gradtx.optimizers import (adabelief, adadelta, adafactor, adagrad, adam, adamax, adamw,
                               amsgrad, lamb, lars, lion, nadam, nadamw, radam, rmsprop, sgd,
                               sign_sgd)
from gradtx.porting import from_torch
from gradtx.fastpath import FlattenState, flatten
from gradtx.compiler import compiler_options, xla_flags
from gradtx.quantization import (DEFAULT_UNSIGNED_FIELDS, QuantizedArray, QuantizedState,
                                 dequantize_blockwise, dynamic_map, float8_map, quantize_blockwise,
                                 quantized_state)
from gradtx.precision import (DynamicLossScaleState, MasterWeightsState, NoMasterCopy,
                              StochasticRoundingState, dynamic_loss_scale, loss_scale,
                              master_weights, stochastic_round, stochastic_rounding)

__version__ = "0.1.0"
