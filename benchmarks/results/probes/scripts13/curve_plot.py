# Thirteenth-session helper (a record of how benchmarks/demo_results.md's learning curve was drawn):
# the held-out rows of a conditioning_probe.py --eval-every log, plotted against the step.
# (conditioning_probe.py --plot now draws the same plot itself.)
# Run from the repo root: .venv/bin/python curve_plot.py LOG.jsonl OUT.png
import json, sys
sys.path.insert(0, ".")
from mdm_dist.viz import line_plot
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
held = [(r["step"], r["heldout"]) for r in rows if "heldout" in r]
names = {"text_to_image": "text-to-image", "text_to_image_shape": "text-to-image: shape",
         "text_to_image_colour": "text-to-image: colour", "captioning": "captioning"}
steps = [s for s, _ in held]
line_plot({label: (steps, [q[k] for _, q in held]) for k, label in names.items()}, sys.argv[2],
          xlabel="training step (batch 64)", ylabel="held-out fraction right",
          title="demo_v12 stages, 8000-step cosine schedule, 100 held-out")
print(json.dumps(held, indent=1))
