"""Train Cofe-Net generators on (clean, degraded) pairs: a plain library, no Ray.

``train(config, train_source, val_source)`` runs Adam on the released loss (reference
cofe-net-architecture.md section 5.1):

    L = L1_R(out_512, clean) + L1_R(out_256, clean_256)                  FOV-masked, both scales
      + lambda_disc * (L1_D(out_512, clean) + L1_D(out_256, clean_256))  optic-disc box, if given
      + lambda_vessel * BCE_R(vessel, vessel_gt)                          if vessel GT exists
      + lambda_lqa * BCE(sigmoid(attention), pooled spot mask)           optional, off by default
      + lambda_gate * BCE(gate logits, pair has an illumination defect)  field_gate models
      + lambda_overshoot * (10 / ln 10) * OS / MSE                        optional, off by default
      + lambda_new_error * (10 / ln 10) * OS_m / MSE                      optional, off by default

where ``L1_R(a, b) = mean(|a - b| * R)`` over all elements, as in the released training code.
A ``field_gate`` model is trained with its gate teacher-forced to that label, so the correction
learns only from pairs that need one, and the gate learns separately, by the BCE term, to tell
them apart. ``OS`` is the FOV mean of max(|out - clean| - |degraded - clean|, 0)^2, the error
an enhancer adds beyond what the degraded input had (over-shoot), and ``MSE`` the pair's own
FOV mean squared error, held constant: per pair, the first-order cost in dB of counting the
over-shoot ``1 + lambda_overshoot`` times in the error. ``OS_m`` is OS with ``m =
new_error_margin`` taken off the added error first: the tail of the over-shoot, the pixels an
enhancer moves far from the clean image (``fundus_batch.metrics.harm`` counts those beyond 40
grey levels), charged without shrinking every smaller correction with them.

Pairs come from a :class:`DegradeSource` (clean images degraded on the fly with the
fundus_batch.degrade engine, a fresh draw per (seed, image id, sample index)) or a
:class:`PairsSource` (the Parquet + image files the pipeline writes). Everything random is drawn
from generators seeded by the config seed and the global step, so a run is reproducible and a
resumed run continues exactly where the checkpoint stopped. A resumed run must keep the
checkpoint's architecture, seed, batch and crop size, optimizer settings (betas,
head_lr_scale) and data (a pairs source's dataset, splits and quality choice); a fresh run
does not overwrite an existing checkpoint. Checkpoints hold only tensors and plain containers
and load with ``torch.load(weights_only=True)``.

Validation degrades each held-out image with each of the seven types (or uses the stored
pairs, read lazily and enhanced a batch at a time), enhances it and reports FOV-masked
PSNR/SSIM of degraded-vs-clean and enhanced-vs-clean per type. A photograph with pairs in both
the training and the validation source is refused.

Modules: :mod:`~fundus_batch.train.config` (the config and its error),
:mod:`~fundus_batch.train.samples` (samples, sources, batches), :mod:`~fundus_batch.train.loss`,
:mod:`~fundus_batch.train.evaluation` (enhancing and scoring) and :mod:`~fundus_batch.train.loop`
(initialisation, checkpoints, the loop). The names below are the package's interface.
"""

from fundus_batch.train.config import (
    CHECKPOINT_FORMAT,
    INITS,
    LOSS_SCALES,
    PIXEL_LOSSES,
    TrainConfig,
    TrainError,
)
from fundus_batch.train.evaluation import TypeMetrics, ValReport, enhance_images, evaluate
from fundus_batch.train.loop import (
    TrainResult,
    check_checkpoint_target,
    fixup_init,
    load_checkpoint,
    registry_entry,
    train,
)
from fundus_batch.train.loss import cofenet_loss
from fundus_batch.train.samples import (
    Batch,
    CleanSample,
    DegradeSource,
    PairsSource,
    TrainItem,
    TrainSource,
    ValItem,
    load_clean_sample,
    make_batch,
    spot_mask,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "INITS",
    "LOSS_SCALES",
    "PIXEL_LOSSES",
    "Batch",
    "CleanSample",
    "DegradeSource",
    "PairsSource",
    "TrainConfig",
    "TrainError",
    "TrainItem",
    "TrainResult",
    "TrainSource",
    "TypeMetrics",
    "ValItem",
    "ValReport",
    "check_checkpoint_target",
    "cofenet_loss",
    "enhance_images",
    "evaluate",
    "fixup_init",
    "load_checkpoint",
    "load_clean_sample",
    "make_batch",
    "registry_entry",
    "spot_mask",
    "train",
]
