"""Grow an existing bench_growth store from its row count to 3M rows in ingests of 30,000, then
serve it warm (recall, rows scanned, batch QPS, one-query p50/p99 at 8-64 probes).

    python benchmarks/grow_on.py   # paths: /tmp/asteria-bench/stores3m/grown, growth-3m data
"""
import numpy as np, time, json, sys
import asteria_store
from asteria_store.testing import recall_at_k
path='/tmp/asteria-bench/stores3m/grown'
base=np.load('/tmp/asteria-bench/growth-3m/base.f16.npy', mmap_mode='r')
st=asteria_store.open(path)
n0=st.info()['count']; t0=time.perf_counter(); rows=0
for lo in range(n0, 3_000_000, 30_000):
    hi=min(3_000_000, lo+30_000)
    t=time.perf_counter()
    r=st.ingest(np.asarray(base[lo:hi], dtype=np.float32), ids=np.arange(lo,hi))
    info=st.info()
    print(json.dumps({"stop":hi,"s":round(time.perf_counter()-t,2),"buckets":info["buckets"],"kind":info["router"],"segments":info["segments"],"refit":r.refitted,"merged":r.merged_segments}), flush=True)
print("ingest wall", time.perf_counter()-t0, "rows", 3_000_000-n0, flush=True)
st.close()
st=asteria_store.open(path, readonly=True)
q=np.load('/tmp/asteria-bench/growth-3m/queries.f16.npy').astype(np.float32)
truth=np.load('/tmp/asteria-bench/growth-3m/gt_3000000_ids.npy')
for p in (8,16,32,64):
    st.search(q,10,probes=p)
    t=time.perf_counter(); ids,_,stats=st.search(q,10,probes=p,explain=True); bs=time.perf_counter()-t
    lat=[]
    for v in q[:200]:
        t=time.perf_counter(); st.query(v,10,probes=p); lat.append(time.perf_counter()-t)
    print(json.dumps({"probes":p,"recall":recall_at_k(ids,truth,10),"scanned":float(stats.scanned.mean()),"kib_read":float(stats.bytes_read.mean())/1024,"batch_qps":len(q)/bs,"p50_ms":float(np.median(lat))*1000,"p99_ms":float(np.percentile(lat,99))*1000}), flush=True)
print(json.dumps(st.info()["router"]), st.info()["buckets"])
