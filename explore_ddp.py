import os, sys; sys.path.insert(0, "/tmp/advJ")
from common_pl import *
import torch.distributed as dist, torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
STEPS = 3
def batches():
    g = torch.Generator().manual_seed(5)
    # uneven-ish: full batch of 10 split 6/4 if UNEVEN
    return [(torch.randn(10, 12, generator=g), torch.randint(0, 4, (10,), generator=g)) for _ in range(STEPS)]
SPLIT = [int(os.environ.get("SPLIT", 5)), 10 - int(os.environ.get("SPLIT", 5))]
class BNNet(nn.Module):
    def __init__(s):
        super().__init__(); torch.manual_seed(0)
        s.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    def forward(s, x): return s.net(x)
def worker(rank, ws, q):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"; os.environ["MASTER_PORT"] = os.environ.get("PORT", "29533")
    dist.init_process_group("gloo", rank=rank, world_size=ws)
    m = DDP(BNNet()); opt = torch.optim.SGD(m.parameters(), lr=0.1)
    scope = gradscope.attach(m, blocks=["net.0", "net.2", "net.4"], optimizer=opt)
    for x, y in batches():
        lo = sum(SPLIT[:rank]); xs, ys = x[lo:lo + SPLIT[rank]], y[lo:lo + SPLIT[rank]]
        # DDP averages gradients; to equal the full-batch mean loss with uneven split, weight by share
        loss = nn.functional.cross_entropy(m(xs), ys)
        loss.backward(); scope.step(loss=loss); opt.step(); opt.zero_grad()
    scope.detach()
    f = scope.frame()
    if rank == 0: q.put(f)
    dist.destroy_process_group()
def reference():
    m = BNNet(); opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with gradscope.attach(m, blocks=["net.0", "net.2", "net.4"], optimizer=opt) as scope:
        for x, y in batches():
            # DDP = mean over ranks of per-rank mean losses
            l0 = nn.functional.cross_entropy(m(x[:SPLIT[0]]), y[:SPLIT[0]])
            scope_hold = None
            out = m(x)  # full-batch forward for activation stats
            lo = out[:SPLIT[0]]; hi = out[SPLIT[0]:]
            loss = 0.5 * (nn.functional.cross_entropy(lo, y[:SPLIT[0]]) + nn.functional.cross_entropy(hi, y[SPLIT[0]:]))
            loss.backward(); scope.step(loss=loss); opt.step(); opt.zero_grad()
    return scope.frame()
if __name__ == "__main__":
    ctx = mp.get_context("spawn"); q = ctx.SimpleQueue()
    ps = [ctx.Process(target=worker, args=(r, 2, q)) for r in range(2)]
    [p.start() for p in ps]; got = q.get(); [p.join() for p in ps]
    ref = reference()
    ref = ref[ref.call == 1].assign(call=0) if (ref.call == 1).any() else ref
    bad = compare(got, ref, "ddp split=%s" % SPLIT, rtol=1e-4, metrics=None)
    sys.exit(1 if bad else 0)
