"""Optimiser of the training job: SGD or AdamW with per-group learning rates and frozen stages.

Every parameter gets one of three labels. `"head"` parameters train at the configured learning
rate, `"backbone"` parameters at `learning_rate * backbone_lr_multiplier`, and `"frozen"`
parameters (the leading backbone stages, or the whole backbone) get zero updates through
`optax.set_to_zero`, so neither momentum nor weight decay moves them.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import optax
from flax import traverse_util

HEAD = "head"
BACKBONE = "backbone"
FROZEN = "frozen"

# Stage of a backbone parameter, from the name of its submodule under "backbone". The stem is
# stage 0, so `frozen_backbone_stages=2` freezes the stem and the first stage.
_STAGE_PATTERNS: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], int]], ...] = (
    # ResNet (torchvision layout): conv1/bn1 stem, layer1_* ... layer4_*.
    (re.compile(r"^(conv1|bn1)$"), lambda m: 0),
    (re.compile(r"^layer(\d+)_\d+$"), lambda m: int(m.group(1))),
    # EfficientNet: stem conv and norm; its blocks_<i> are numbered across stages and are
    # mapped by `efficientnet_block_stages`; the head conv comes after every stage.
    (re.compile(r"^stem_.*$"), lambda m: 0),
    (re.compile(r"^(head_conv|head_bn|classifier)$"), lambda m: 1_000_000),
    # ViT: patch embedding, class token and position embedding as the stem, encoder blocks as
    # stages 1.., the final norm and any top after every block.
    (re.compile(r"^(embedding|cls|posembed_input)$"), lambda m: 0),
    (re.compile(r"^encoderblock_(\d+)$"), lambda m: int(m.group(1)) + 1),
    (re.compile(r"^(encoder_norm|head|top.*|head_.*)$"), lambda m: 1_000_000),
)
# Containers whose children carry the stage names (ViT's "Transformer").
_CONTAINERS = ("Transformer",)


def efficientnet_block_stages(backbone_name: str) -> dict[str, int]:
    """Return {"blocks_<i>": stage} for an EfficientNet-Lite variant (first stage = 1)."""
    from aqhash_jax.models import efficientnet

    stages = efficientnet.stage_layout(backbone_name.removeprefix("efficientnet_"))
    mapping, block_index = {}, 0
    for stage_index, stage in enumerate(stages):
        for _ in range(stage.repeats):
            mapping[f"blocks_{block_index}"] = stage_index + 1
            block_index += 1
    return mapping


def backbone_stage(names: tuple[str, ...], backbone_name: str | None = None) -> int | None:
    """Return the stage index (stem = 0) of a backbone parameter path (below "backbone"), or None."""
    names = tuple(str(name) for name in names)
    if backbone_name and backbone_name.startswith("efficientnet_"):
        stage = efficientnet_block_stages(backbone_name).get(names[0])
        if stage is not None:
            return stage
    if len(names) > 1 and names[0] in _CONTAINERS:
        names = names[1:]
    for pattern, to_stage in _STAGE_PATTERNS:
        match = pattern.match(names[0])
        if match:
            return to_stage(match)
    return None


def param_labels(
    params: Mapping[str, Any],
    *,
    freeze_backbone: bool,
    frozen_backbone_stages: int,
    backbone_name: str | None = None,
) -> dict[str, Any]:
    """Label every parameter leaf "head", "backbone" or "frozen".

    `params` is the model's parameter tree: either `{"backbone": ..., "head": ...}` (the whole
    model) or a head-only tree without a "backbone" entry (features mode), whose leaves are all
    labelled "head". Raises ValueError when a stage cannot be assigned to a backbone submodule
    that has to be frozen by stage.
    """
    flat = traverse_util.flatten_dict(dict(params))
    labels = {}
    for path in flat:
        if path[0] != "backbone":
            labels[path] = HEAD
            continue
        if freeze_backbone:
            labels[path] = FROZEN
            continue
        if frozen_backbone_stages <= 0:
            labels[path] = BACKBONE
            continue

        stage = backbone_stage(path[1:], backbone_name)
        if stage is None:
            raise ValueError(
                f"cannot tell the stage of backbone parameter {'/'.join(map(str, path))} to "
                f"apply optim.frozen_backbone_stages={frozen_backbone_stages}; set "
                "--config.optim.frozen_backbone_stages=0 or --config.optim.freeze_backbone=True"
            )
        labels[path] = FROZEN if stage < frozen_backbone_stages else BACKBONE
    return traverse_util.unflatten_dict(labels)


def make_schedule(optim_config: Any, total_steps: int, steps_per_outer_iteration: int) -> optax.Schedule:
    """Build the learning-rate schedule (before the per-group multiplier) from `config.optim`.

    `schedule="step"` multiplies the rate by `decay_factor` at each step in `step_boundaries`.
    A boundary given as a negative number -n means "after outer iteration n" and is converted
    with `steps_per_outer_iteration`, so ADSH configs can express "x0.1 after iteration 30".
    """
    base = float(optim_config.learning_rate)
    warmup = int(optim_config.warmup_steps)
    name = optim_config.schedule
    decay_steps = max(total_steps - warmup, 1)

    if name == "cosine":
        main = optax.cosine_decay_schedule(base, decay_steps)
    elif name == "constant":
        main = optax.constant_schedule(base)
    elif name == "step":
        boundaries = {}
        for boundary in optim_config.step_boundaries:
            boundary = int(boundary)
            if boundary < 0:
                boundary = -boundary * steps_per_outer_iteration
            boundaries[max(boundary - warmup, 0)] = float(optim_config.decay_factor)
        main = optax.piecewise_constant_schedule(base, boundaries)
    else:
        raise ValueError(
            f"unknown optim.schedule {name!r}; use 'cosine', 'step' or 'constant'"
        )

    if warmup <= 0:
        return main
    warmup_schedule = optax.linear_schedule(0.0, base, warmup)
    return optax.join_schedules([warmup_schedule, main], [warmup])


def _base_optimizer(optim_config: Any, learning_rate: optax.Schedule) -> optax.GradientTransformation:
    name = optim_config.name
    if name == "sgd":
        # Weight decay is added to the gradient before momentum, as in torch.optim.SGD.
        return optax.chain(
            optax.add_decayed_weights(float(optim_config.weight_decay)),
            optax.sgd(learning_rate, momentum=float(optim_config.momentum) or None),
        )
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=float(optim_config.weight_decay))
    raise ValueError(f"unknown optim.name {name!r}; use 'sgd' or 'adamw'")


def make_optimizer(
    optim_config: Any,
    params: Mapping[str, Any],
    *,
    total_steps: int,
    steps_per_outer_iteration: int = 1,
    backbone_name: str | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Build the optimiser for `params` from `config.optim`.

    Returns the transformation and the head's learning-rate schedule (for logging). Gradients are
    clipped by global norm (`clip_norm > 0`) over the trainable parameters before the
    per-group updates.
    """
    schedule = make_schedule(optim_config, total_steps, steps_per_outer_iteration)
    multiplier = float(optim_config.backbone_lr_multiplier)

    def backbone_schedule(step):
        return schedule(step) * multiplier

    labels = param_labels(
        params,
        freeze_backbone=bool(optim_config.freeze_backbone),
        frozen_backbone_stages=int(optim_config.frozen_backbone_stages),
        backbone_name=backbone_name,
    )
    transforms = {
        HEAD: _base_optimizer(optim_config, schedule),
        BACKBONE: _base_optimizer(optim_config, backbone_schedule),
        FROZEN: optax.set_to_zero(),
    }
    optimizer = optax.multi_transform(transforms, labels)

    if float(optim_config.clip_norm) > 0:
        # Frozen leaves are zeroed first so they do not count towards the clipped norm.
        zero_frozen = optax.multi_transform(
            {HEAD: optax.identity(), BACKBONE: optax.identity(), FROZEN: optax.set_to_zero()},
            labels,
        )
        optimizer = optax.chain(
            zero_frozen, optax.clip_by_global_norm(float(optim_config.clip_norm)), optimizer
        )
    return optimizer, schedule
