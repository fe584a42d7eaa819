"""The controller actor (``NDIF_CONTROLLER_IMPORT_PATH=ndif_cpu.controller.ControllerActor``).

ndif 0.1.2 sizes a model with ``Remotable.describe_checkpoint(key, dtype, trust_remote_code=...)`` and
``Remotable.max_tp_size(key, trust_remote_code=...)``; nnsight 0.8.1 takes no ``trust_remote_code`` there,
so every on-demand deploy fails ("Could not deploy this model"). This module gives ndif's evaluator, and
only it, a ``Remotable`` that drops the keyword (we never deploy remote code: ``trust_remote_code`` is
always False here).
"""

import ray
from nnsight.modeling.mixins.remotable import Remotable

from ndif.services.ray.deployments.controller import controller
from ndif.services.ray.deployments.controller.cluster import evaluator


class _RemotableWithoutTrustRemoteCode:
    @staticmethod
    def describe_checkpoint(model_key, dtype, trust_remote_code=False):
        return Remotable.describe_checkpoint(model_key, dtype)

    @staticmethod
    def max_tp_size(model_key, trust_remote_code=False):
        return Remotable.max_tp_size(model_key)


evaluator.Remotable = _RemotableWithoutTrustRemoteCode



class CPUControllerActor(controller._ControllerActor):
    """ndif's controller, defined here so that its Ray worker imports this module (and the fix above)."""


ControllerActor = ray.remote(num_cpus=1, num_gpus=0, max_restarts=-1, resources={"head": 1})(CPUControllerActor)
