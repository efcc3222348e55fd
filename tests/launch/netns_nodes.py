"""Nodes on one machine for multi-node tests: each node is a network namespace with
its own veth `eth0` (10.77.0.i/24, no default route) on a bridge that lives in a
namespace of its own, and its own hostname (a UTS namespace per command: Open MPI's
shared-memory transport names its segments after the hostname, so two "nodes" with
one hostname would open the same files). mpirun runs inside node n1 and reaches the
others through an rsh agent that does what ssh would: run the command on that node,
with a clean environment. Nothing is ever sent to these addresses from the host's
own namespace.

    with Nodes(3, workdir) as nodes:
        nodes.run(["mpirun", "--mca", "plm_rsh_agent", nodes.agent, ...])  # on n1
"""
import glob, os, shutil, signal, subprocess, sys


class NodesUnavailable(Exception):
    pass


class Nodes:
    def __init__(self, count, workdir, slots=2):
        self.count, self.workdir, self.slots = count, workdir, slots
        self.prefix = f"elbo{os.getpid() % 100000}"
        self.names = [f"n{i + 1}" for i in range(count)]
        self.agent = os.path.join(workdir, "netns-agent.sh")
        self.hostfile = os.path.join(workdir, "hosts")
        self._made = []

    def _ip(self, *args):
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise NodesUnavailable(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def __enter__(self):
        os.makedirs(self.workdir, exist_ok=True)
        # A test killed by ctest's timeout (SIGTERM) still tears the namespaces down:
        # the signal becomes SystemExit, which runs __exit__.
        self._old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        if shutil.which("ip") is None or shutil.which("unshare") is None:
            raise NodesUnavailable("ip (iproute2) or unshare is missing")
        try:
            br = f"{self.prefix}-br"
            self._ip("netns", "add", br)
            self._made.append(br)
            self._ip("-n", br, "link", "add", "br0", "type", "bridge")
            self._ip("-n", br, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                ns = f"{self.prefix}-{name}"
                self._ip("netns", "add", ns)
                self._made.append(ns)
                inside, outside = f"v{self.prefix}{i}", f"b{self.prefix}{i}"
                self._ip("link", "add", inside, "type", "veth", "peer", "name", outside)
                self._ip("link", "set", inside, "netns", ns)
                self._ip("link", "set", outside, "netns", br)
                self._ip("-n", ns, "link", "set", inside, "name", "eth0")
                self._ip("-n", ns, "addr", "add", f"10.77.0.{i + 1}/24", "dev", "eth0")
                self._ip("-n", ns, "link", "set", "eth0", "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
                self._ip("-n", br, "link", "set", outside, "master", "br0")
                self._ip("-n", br, "link", "set", outside, "up")
        except NodesUnavailable:
            self.__exit__(None, None, None)
            raise
        with open(self.agent, "w") as f:
            f.write(f"""#!/bin/sh
# rsh agent for the test nodes: AGENT HOST COMMAND... runs COMMAND on HOST (its
# network namespace, its hostname) with a clean environment, as ssh would.
host=$1; shift
exec env -i PATH="$PATH" HOME="${{HOME:-/root}}" ip netns exec {self.prefix}-$host \\
  unshare --uts sh -c 'hostname "$0"; exec sh -c "$*"' "$host" "$@"
""")
        os.chmod(self.agent, 0o755)
        with open(self.hostfile, "w") as f:
            f.writelines(f"{n} slots={self.slots}\n" for n in self.names)
        return self

    def command(self, argv, node="n1", host_sys=False):
        """argv run on `node` (its namespace and hostname), environment kept. With
        host_sys, the host's /sys stays in view (nsenter instead of `ip netns exec`,
        which mounts a /sys of its own without /sys/fs/cgroup, where slurmd fails)."""
        enter = (["nsenter", f"--net=/run/netns/{self.prefix}-{node}"] if host_sys
                 else ["ip", "netns", "exec", f"{self.prefix}-{node}"])
        return [*enter, "unshare", "--uts", "sh", "-c", 'hostname "$0"; exec "$@"', node, *argv]

    def run(self, argv, node="n1", **kw):
        return subprocess.run(self.command(argv, node), **kw)

    def link(self, node, up):
        self._ip("-n", f"{self.prefix}-{node}", "link", "set", "eth0", "up" if up else "down")

    def throttle(self, node, rate):
        """Limits `node`'s link to `rate` (tc syntax, e.g. "1mbit") both ways: on its
        eth0 and on the bridge's end of its veth; rate None lifts the limit."""
        i = self.names.index(node)
        for ns, dev in ((f"{self.prefix}-{node}", "eth0"), (f"{self.prefix}-br", f"b{self.prefix}{i}")):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
            if rate is not None:
                r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                                    rate, "burst", "32kbit", "latency", "400ms"], capture_output=True, text=True)
                if r.returncode != 0:
                    raise NodesUnavailable(f"tc tbf on {dev} in {ns}: {r.stderr.strip()}")

    def kill_all(self):
        """SIGKILL every process still running on the nodes (a daemon cut off by a test
        would otherwise outlive its namespace, holding the test's pipes)."""
        for ns in self._made:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass

    def __exit__(self, *exc):
        if getattr(self, "_old_term", None) is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None
        self.kill_all()
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made = []
        # Open MPI's per-host leftovers of these hostnames (shared /tmp and /dev/shm).
        for n in self.names:
            for p in glob.glob(f"/dev/shm/vader_segment.{n}.*") + glob.glob(f"/tmp/ompi.{n}.*"):
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
        return False
