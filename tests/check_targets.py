"""The project's own speed and accuracy goals, checked against a benchmark.json (default
results/benchmark.json): one line per goal, and exit 1 if any is missed. These are goals this
project set itself; the user-facing report (benchmark.md) shows only measurements.

    python tests/check_targets.py [results/benchmark.json]"""
import json
import sys

DENSE, LOOP, DATALOADER, AUTO = "ort-dense", "ort-loop", "ort-loop-dataloader", "ort-auto"  # the registry's keys


def targets(rows, count, fused_profile=None):
    by_key = {row["key"]: row for row in rows}
    fast, graph, way = by_key[DENSE], by_key[LOOP], by_key[DATALOADER]
    fp32 = fast["accuracy"]
    checks = [
        ("ONNX Runtime CPU dense graph, batch-1 p50 vs floor", fast["vs_floor_b1"], "<=", 2.0),
        ("ONNX Runtime CPU dense graph, test set at best batch vs floor", fast["vs_floor_test_set"], "<=", 2.0),
        ("dense graph vs loop graph, batch-1 p50 speed-up",
         graph["model"]["latency_us"]["p50"] / fast["model"]["latency_us"]["p50"], ">=", 4.0),
        ("dense graph vs a per-image DataLoader, end-to-end test set speed-up",
         way["model"]["best_test_set_ms"] / fast["model"]["best_test_set_ms"], ">=", 100.0),
    ] + [(f"{row['name']}: accuracy change vs fp32 (points)", row["accuracy"] - fp32, ">=", -0.3)
         for row in rows if "INT8" in row["name"]] + frontier_targets(rows, fp32, count) + fused_targets(fused_profile)
    return [{"target": name, "value": value, "rule": f"{op} {bound}",
             "met": value <= bound if op == "<=" else value >= bound} for name, value, op, bound in checks]


def frontier_targets(rows, fp32, count):
    """The fastest path that keeps accuracy (>= 98.0%, within 0.3 points of fp32, argmax
    agreement >= 99.9%) at bulk and at batch 1, and what the dense/loop choice costs."""
    by_key = {row["key"]: row for row in rows}
    keeps = [r for r in rows if "latency_us" in r["model"] and r["accuracy"] >= 98.0 and r["accuracy"] >= fp32 - 0.3
             and r.get("agreement", 0) >= 99.9]
    checks = []
    if keeps:
        bulk = min(keeps, key=lambda r: r["model"]["best_test_set_ms"])
        single = min(keeps, key=lambda r: r["model"]["latency_us"]["p50"])
        checks += [(f"bulk: all {count} test images, fastest path that keeps accuracy ({bulk['name']}), ms",
                    bulk["model"]["best_test_set_ms"], "<=", round(10.0 * count / 10000, 3)),
                   (f"batch 1: p50 through Python, fastest path that keeps accuracy ({single['name']}), us",
                    single["model"]["latency_us"]["p50"], "<=", 15.0)]
        def worse_ratio(r):
            return max(r["model"]["latency_us"]["p50"] / single["model"]["latency_us"]["p50"],
                       r["model"]["best_test_set_ms"] / bulk["model"]["best_test_set_ms"])
        both = min(keeps, key=worse_ratio)
        checks.append((f"one path within 1.3x of the fastest at both batch 1 and bulk ({both['name']}): "
                       "its worse ratio", worse_ratio(both), "<=", 1.3))
        for r in {bulk["name"]: bulk, single["name"]: single}.values():
            checks += [(f"{r['name']}: argmax agreement with fp32 (%)", r["agreement"], ">=", 99.9),
                       (f"{r['name']}: accuracy (%)", r["accuracy"], ">=", 98.0)]
    else:
        checks.append(("a path that keeps accuracy (>= 98.0%, within 0.3 points, agreement >= 99.9%): best accuracy",
                       max(r["accuracy"] for r in rows), ">=", 98.0))
    auto, dense, loop = by_key[AUTO], by_key[DENSE], by_key[LOOP]
    checks += [("auto routing vs the better of dense and loop, batch-1 p50",
                auto["model"]["latency_us"]["p50"] / min(dense["model"]["latency_us"]["p50"],
                                                         loop["model"]["latency_us"]["p50"]), "<=", 1.3),
               ("auto routing vs the better of dense and loop, test set at best batch",
                auto["model"]["best_test_set_ms"] / min(dense["model"]["best_test_set_ms"],
                                                        loop["model"]["best_test_set_ms"]), "<=", 1.3)]
    return checks


def fused_targets(profile):
    """Each SIMD path of the fused operator within 1.5x of its own limit (its product instruction alone
    doing the test set's multiply-adds, plus the memory floor), one image within 2 us on the first path
    (the fastest this CPU has)."""
    if not profile or not profile.get("paths"):  # a report from before the per-path limits has none
        return []
    checks = [(f"fused operator, {path['kernel']} path: test set vs its instruction alone + the memory floor",
               path["vs_limit"], "<=", 1.5) for path in profile["paths"]]
    first = profile["paths"][0]
    return checks + [(f"fused operator, {first['kernel']} path: one image p50 from numpy to numpy, us",
                      first["single_p50_us"], "<=", 2.0)]


def main(argv):
    path = argv[1] if len(argv) > 1 else "results/benchmark.json"
    with open(path) as f:
        benchmark = json.load(f)
    checks = targets(benchmark["rows"], benchmark["settings"]["images"], benchmark.get("fused_profile"))
    for t in checks:
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:.2f} ({t['rule']})")
    missed = sum(not t["met"] for t in checks)
    print(f"{len(checks) - missed} of {len(checks)} goals met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
