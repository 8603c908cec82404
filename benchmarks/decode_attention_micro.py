import time, jax, jax.numpy as jnp
b,k,g,s,d = 64,8,4,384,128
L = 32
key = jax.random.key(0)
q = jax.random.normal(key, (L,b,k,g,d), jnp.bfloat16)
K = jax.random.normal(key, (L,b,k,s,d), jnp.bfloat16)
V = jax.random.normal(key, (L,b,k,s,d), jnp.bfloat16)
def dot_attn(q,K,V):
    sc = jnp.einsum("bkgd,bksd->bkgs", q, K, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(sc, -1).astype(V.dtype)
    return jnp.einsum("bkgs,bksd->bkgd", p, V)
def red_attn(q,K,V):
    sc = jnp.sum(q[:,:,:,None,:].astype(jnp.float32)*K[:,:,None,:,:].astype(jnp.float32), -1)
    p = jax.nn.softmax(sc, -1)
    return jnp.sum(p[..., None]*V[:,:,None,:,:].astype(jnp.float32), 3).astype(V.dtype)
def dot_f32out(q,K,V):
    sc = jnp.einsum("bkgd,bksd->bkgs", q, K, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(sc, -1)
    return jnp.einsum("bkgs,bksd->bkgd", p, V.astype(jnp.float32)).astype(V.dtype)
for name, f in [("dot", dot_attn), ("reduce", red_attn), ("dot_f32", dot_f32out)]:
    @jax.jit
    def run(q,K,V):
        return jax.lax.map(lambda a: f(*a), (q,K,V))
    run(q,K,V).block_until_ready()
    t=time.perf_counter()
    for _ in range(20): o=run(q,K,V)
    o.block_until_ready()
    dt=(time.perf_counter()-t)/20
    print(name, f"{dt*1e3:.3f} ms for {L} layers; K+V bytes {2*K.nbytes/1e9:.2f} GB -> {2*K.nbytes/dt/1e12:.2f} TB/s", flush=True)
