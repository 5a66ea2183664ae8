"""Forward processes, training objectives and samplers of MDM (equations in each module doc).

- :mod:`~mdm_dist.diffusion.schedules`: VP (linear / cosine) and SEDD log-linear noise.
- :mod:`~mdm_dist.diffusion.objectives`: score entropy, DSM weights, the total ``mdm_loss``.
- :mod:`~mdm_dist.diffusion.samplers`: ``sample`` (dpm2 / ddim / euler; joint, t2i, i2t; CFG),
  ``sample_best_of`` (text-to-image, reranked by the model's own captioner).
"""

from mdm_dist.diffusion.objectives import (
    TASKS, absorb, draw_tasks, dsm_image_weight, mdm_loss, score_entropy_absorbing, tasks_from_uniforms,
)
from mdm_dist.diffusion.samplers import (
    SAMPLERS, absorbing_step, caption_pseudo_log_likelihood, ddim_step, guide, pf_ode_drift, sample, sample_best_of,
)
from mdm_dist.diffusion.schedules import LogLinearNoise, Schedules, VPSchedule, from_config

__all__ = [
    "VPSchedule", "LogLinearNoise", "Schedules", "from_config",
    "score_entropy_absorbing", "dsm_image_weight", "mdm_loss", "draw_tasks", "tasks_from_uniforms", "absorb", "TASKS",
    "sample", "sample_best_of", "caption_pseudo_log_likelihood", "guide", "pf_ode_drift", "ddim_step",
    "absorbing_step", "SAMPLERS",
]
