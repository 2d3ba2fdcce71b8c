"""How long a node whose network came back takes to return to service on the test cluster (root, network
namespaces; tests/localcluster.py's two-node Slurm). Each trial: node 2's link down until slurmctld sets the node
DOWN, then up; prints the seconds until the node is IDLE again. With nothing of its own to send, the node returns only
at Slurm's next registration request (every 20 ping cycles of SlurmdTimeout/3 s: 200 s on that cluster), the bound
test_cluster.py's lost-node test waits for.

    python benchmarks/cluster_node_return.py [--trials 2]
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from localcluster import REREGISTER_PERIOD_S, LocalCluster, unavailable_reason  # noqa: E402


def node_state(cluster: LocalCluster, name: str) -> str:
    return next(w for w in cluster.scontrol("show", "node", name).split() if w.startswith("State="))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=2)
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"cannot start the test cluster here: {reason}")
    cluster = LocalCluster()
    cluster.start()
    try:
        n2 = cluster.nodes[1]
        for trial in range(args.trials):
            t0 = time.monotonic()
            subprocess.run(["ip", "link", "set", n2.veth, "down"], check=True)
            while "DOWN" not in node_state(cluster, n2.name):
                time.sleep(0.5)
            print(f"trial {trial + 1}: DOWN {time.monotonic() - t0:.1f} s after the link went down", flush=True)
            time.sleep(3)
            subprocess.run(["ip", "link", "set", n2.veth, "up"], check=True)
            t1 = time.monotonic()
            while not node_state(cluster, n2.name).startswith("State=IDLE"):
                time.sleep(0.5)
            print(f"trial {trial + 1}: IDLE {time.monotonic() - t1:.1f} s after the link came back "
                  f"(Slurm's bound: {REREGISTER_PERIOD_S} s)", flush=True)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
