# run.py CODE_DIR N RUNS [raw]: quix_eps of the code in CODE_DIR against the broker in ./bootstrap
import sys, time, importlib.util, asyncio, os, resource
code, n, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, code)
spec = importlib.util.spec_from_file_location("benchspeed", "/work/wt/quix/bench/speed.py")
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
from pathlib import Path
from lambdalake.settings import Settings
import lambdalake.speed.quix as q
assert q.__file__.startswith(code), q.__file__
bootstrap, home = Path("/work/wt/tmp-quix/prof/bootstrap").read_text().split()
home = Path(home)
settings = Settings(bus="kafka", kafka_bootstrap=bootstrap, topic="bench.events",
                    partitions=4, home=home, store=(home / "lake").as_uri())
tag = "OLD" if code.startswith("/work/main") else "NEW"
for run in range(runs):
    t0 = time.process_time()
    eps = b.quix_eps(settings, n, run)
    cpu = time.process_time() - t0
    print(f"{tag} quix: {eps:,.0f} eps, cpu {cpu:.2f}s = {cpu/n*1e6:.2f} us/ev load {os.getloadavg()[0]:.1f}", flush=True)
    if len(sys.argv) > 4:
        print(f"raw aiokafka: {asyncio.run(b.raw_aiokafka(bootstrap, settings.topic, n)):,.0f}", flush=True)
        print(f"raw confluent: {b.raw_confluent(bootstrap, settings.topic, n):,.0f}", flush=True)
