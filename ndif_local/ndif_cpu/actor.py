"""The model actor on CPU (selected with ``NDIF_DEFAULT_MODEL_ACTOR_CLASS=ndif_cpu.actor.CPUModelActor``).

ndif's ``BaseModelDeployment`` assumes CUDA where it loads (``torch.cuda.set_device``, per-process memory
caps, ``synchronize``, a check that every tensor sits on an assigned GPU), parks (GPU -> CPU) and cleans up
(``empty_cache``). Everything else (deserialising the request, running the user's block on a worker thread
raced against the execution timeout, returning the result inline through Redis or through the object store,
formatting errors) is ndif's own code and runs unchanged. The controller still places the actor on the
node's one fake GPU (``ray start --num-gpus=1``): ndif only manages nodes that report one.
"""

import gc

import ray
import torch
from nnsight.modeling.huggingface import HuggingFaceModel

from ndif.services.ray.deployments.modeling.base import BaseModelDeployment


class CPUModelDeployment(BaseModelDeployment):
    # The weights already live in CPU memory: there is nothing to park, so the controller evicts instead.
    CACHEABLE = False

    def load_from_disk(self) -> HuggingFaceModel:
        # One thread, as Ray gives an actor with num_cpus=1 (OMP_NUM_THREADS=1); stated here so a client
        # running torch.set_num_threads(1) reproduces the server's reduction order bit for bit.
        torch.set_num_threads(1)
        model = HuggingFaceModel.from_model_key(self.model_key, dispatch=True, dtype=self.dtype_name, **self.kwargs)
        model._module.requires_grad_(False)
        return model

    async def to_cache(self) -> None:  # pragma: no cover - CACHEABLE is False, the controller never parks us
        raise NotImplementedError("the CPU model actor is not cacheable")

    def from_cache(self, gpu_mem_bytes_by_id) -> None:  # pragma: no cover - see to_cache
        raise NotImplementedError("the CPU model actor is not cacheable")

    def cleanup(self) -> None:
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


CPUModelActor = ray.remote(num_cpus=1, max_restarts=-1)(CPUModelDeployment)
