# Thirteenth-session helper (a record of how benchmarks/demo_results.md's learning curve was drawn):
# the held-out rows of a conditioning_probe.py --eval-every log (X1 ran before --plot existed),
# plotted with the function behind conditioning_probe.py --plot.
# Run from the repo root: .venv/bin/python curve_plot.py LOG.jsonl OUT.png
import json, sys
sys.path[:0] = [".", "benchmarks"]
from conditioning_probe import plot_heldout_curve
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
held = [(r["step"], r["heldout"]) for r in rows if "heldout" in r]
plot_heldout_curve(held, sys.argv[2], "demo_v12 stages, 8000-step cosine schedule, 100 held-out")
print(json.dumps(held, indent=1))
