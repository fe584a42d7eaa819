import time, torch, lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends import transformer_lens as tl
from lens_plugins.models import default_model_dir, load_hf_model
m = lp.load_default_model(backend="transformer_lens")
P = "The Eiffel Tower is in the city of"
t=time.time()
a = tl.run_attribution(m, P, " Paris", " London", by="neuron", effects=5)
print("tl", time.time()-t)
print(a.top_neurons(5))
print((a.neuron_sums + a.mlp_bias - a.mlp).abs().max(), a.mlp.abs().max())
print(a.error, a.labels[:8])
print(a.tokens("L29H0")["promoted"][:3], a.tokens(a.neuron_labels()[0]))
nn = lpn.wrap_model(*load_hf_model(default_model_dir()))
t=time.time()
b = lpn.run_attribution(nn, P, " Paris", " London", by="neuron", effects=5)
print("nn", time.time()-t)
print(b.top_neurons(5))
for f in ["neuron_sums","neuron_values","mlp","promoted_logits"]:
    print(f, (getattr(a,f)-getattr(b,f)).abs().max())
print(torch.equal(a.neuron_index,b.neuron_index), torch.equal(a.promoted_ids,b.promoted_ids), torch.equal(a.suppressed_ids,b.suppressed_ids))
