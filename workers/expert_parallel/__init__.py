"""Expert parallelism: one worker's MoE layers sharded across the ranks of a process group.

placement.py   which rank holds which experts (contiguous or round-robin)
dispatch.py    the dispatch/combine contract (ExpertDispatcher) and make_dispatcher
replicated.py  all ranks compute their experts for all tokens, one all-reduce
all_to_all.py  pairs travel to their owners and back by all-to-all
moe_backend.py the MoEBackend of a rank: replicated router, dispatcher, local experts
"""
