"""Seconds per training batch of `model.losses` by max_seq_len and objective (random ids, 1 thread).

    PYTHONPATH=. python bench/objective_step.py
"""
import time, torch
torch.set_num_threads(1)
from feddmmr.models import UR4RecV2MoE
for L, obj, B in [(50,"sampled_softmax",64),(50,"full_softmax",64),(200,"sampled_softmax",64),(200,"full_softmax",64)]:
    torch.manual_seed(0)
    m = UR4RecV2MoE(num_items=3953, max_seq_len=L, visual_dim=1280)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    x = torch.randint(1, 3953, (B, L)); y = torch.randint(1, 3953, (B, L)); neg = torch.randint(1, 3953, (B, 100))
    ts=[]
    for i in range(4):
        t=time.time(); out=m.losses(x,y,neg,objective=obj); opt.zero_grad(); out["loss"].backward(); opt.step(); ts.append(time.time()-t)
    print(L, obj, B, "s/batch", round(min(ts[1:]),3), flush=True)
