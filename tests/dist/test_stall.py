#!/usr/bin/env python3
"""No hangs: stop one rank (SIGSTOP, a stalled peer that holds its sockets open, the
case a dead TCP peer cannot signal) in the middle of a 2-rank training run. The other
rank must leave its collective after dist.timeout_s, name itself and the operation,
and take the job down with exit code 3 (kExitPeerFailure) well before a minute."""
import os, re, signal, subprocess, sys, time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
out = os.path.join(a.work, "run")
launch = (f'echo $$ > {a.work}/pid.$OMPI_COMM_WORLD_RANK; exec "$0" "$@"')
cmd = ["mpirun", "-np", "2", "sh", "-c", launch, a.elbo, "train", a.spec,
       "--set", "device=cpu", "--set", f"data.train={a.data}/train", "--set", "data.test=",
       "--set", "data.max_samples=960", "--set", "train.epochs=100000", "--set", "train.log_every=5",
       "--set", "dist.timeout_s=3", "--set", f"output.dir={out}"]
proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
victim = None
try:
    metrics = os.path.join(out, "metrics.csv")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3 and os.path.exists(f"{a.work}/pid.1"):
            break
        time.sleep(0.2)
    if proc.poll() is not None:
        sys.exit(f"training ended before the stall could be injected ({proc.returncode}):\n{proc.communicate()}")
    victim = int(open(f"{a.work}/pid.1").read())
    os.kill(victim, signal.SIGSTOP)
    t0 = time.time()
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        sys.exit("FAIL: the job still runs 60 s after rank 1 stalled (dist.timeout_s=3): it hangs")
    took = time.time() - t0
finally:
    if victim is not None:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(victim, sig)
            except ProcessLookupError:
                pass
    if proc.poll() is None:
        proc.kill()

print(f"job ended {took:.1f} s after rank 1 was stopped, exit code {proc.returncode}")
print(stderr.strip()[:2000])
pattern = (r"rank 0 \([^)]*\): .*(all-reduce|broadcast|barrier).* did not finish within 3 s \(dist\.timeout_s\): "
           r"rank\(s\) 1 \([^)]*\) did not answer")
failures = []
if not re.search(pattern, stderr):
    failures.append(f"stderr does not match {pattern!r}")
if proc.returncode != 3:
    failures.append(f"exit code {proc.returncode}, expected 3 (peer failure)")
if took < 2.5:
    failures.append(f"ended after {took:.1f} s, before the 3 s timeout could have fired")
if failures:
    sys.exit("FAIL: " + "; ".join(failures))
