"""offload: routed experts placed across GPU / RAM / disk, cached and prefetched (README.md, "Expert offloading").

- planner.py      placement plan from config.json + budgets (`localglm plan`)
- cost_model.py   measured/assumed bandwidths; copy-to-device vs compute-on-CPU per miss; tok/s estimate
- device.py       SimulatedDevice (separate buffers, real copies, enforced budget, timing model), CudaDevice
- expert_cache.py an expert = byte blob + codec (Bf16Codec now, quantized codecs later); the slot cache
- policies.py     LRU, LFU with decay, router-statistics guided, Belady (offline optimum)
- router_stats.py per-layer use and next-layer co-occurrence, saved beside the model
- prefetch.py     next-layer prediction from the next router applied to the current hidden state
- backend.py      OffloadedExperts (the ExpertBackend) and `build_offloaded_experts`, which localglm.load calls
- trace.py        routing traces (record, save, load); simulator.py replays them (`localglm simulate`)
- metrics.py      counters for GenerationStats.backend
"""
