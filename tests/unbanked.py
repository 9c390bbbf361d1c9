"""Reference implementations the banked trainer must agree with: the model with one nn.Linear per
matrix, and the replicated Muon that steps each matrix on every rank (both as they were before
the weights moved into banks). Tests only; the trainer ships neither."""
import math

import torch
import torch.nn.functional as F
from torch import nn

import train_gpt as tg


class UnbankedAttention(nn.Module):
    def __init__(self, cfg, xsa: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.NUM_HEADS, cfg.NUM_KV_HEADS, cfg.head_dim
        self.rope_dims, self.rope_base, self.xsa = cfg.ROPE_DIMS, cfg.ROPE_BASE, xsa
        kv_dim = cfg.NUM_KV_HEADS * cfg.head_dim
        self.c_q = nn.Linear(cfg.MODEL_DIM, cfg.MODEL_DIM, bias=False)
        self.c_k = nn.Linear(cfg.MODEL_DIM, kv_dim, bias=False)
        self.c_v = nn.Linear(cfg.MODEL_DIM, kv_dim, bias=False)
        self.proj = nn.Linear(cfg.MODEL_DIM, cfg.MODEL_DIM, bias=False)
        self.q_gain = nn.Parameter(torch.full((cfg.NUM_HEADS,), cfg.QK_GAIN_INIT))
        self.attend = tg.attention_function("sdpa")

    def forward(self, x):
        B, T, _ = x.shape
        q = tg.rms_norm(self.c_q(x).view(B, T, self.heads, self.head_dim))
        k = tg.rms_norm(self.c_k(x).view(B, T, self.kv_heads, self.head_dim))
        v = self.c_v(x).view(B, T, self.kv_heads, self.head_dim)
        if self.rope_dims:
            cos, sin = tg.rotary_tables(T, self.rope_dims, self.rope_base, x.device, q.dtype)
            q, k = tg.apply_partial_rope(q, cos, sin), tg.apply_partial_rope(k, cos, sin)
        y = self.attend((q * self.q_gain[:, None]).to(v.dtype), k.to(v.dtype), v)
        if self.xsa:
            y = tg.exclusive_self_attention(y, v)
        return self.proj(y.reshape(B, T, -1))


class UnbankedMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.MLP_MULT * cfg.MODEL_DIM)
        self.fc = nn.Linear(cfg.MODEL_DIM, hidden, bias=False)
        self.proj = nn.Linear(hidden, cfg.MODEL_DIM, bias=False)

    def forward(self, x):
        return self.proj(F.leaky_relu(self.fc(x), 0.5).square())


class UnbankedBlock(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.norm_scale = 1.0 / math.sqrt(layer + 1)
        self.parallel = layer >= cfg.PARALLEL_RESIDUAL_START
        self.attn = UnbankedAttention(cfg, xsa=layer >= cfg.NUM_LAYERS - cfg.XSA_LAST_N)
        self.mlp = UnbankedMLP(cfg)
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.MODEL_DIM), torch.zeros(cfg.MODEL_DIM))))
        self.attn_scale = nn.Parameter(torch.ones(cfg.MODEL_DIM))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.MODEL_DIM))

    def forward(self, x, x0):
        x = self.resid_mix[0] * x + self.resid_mix[1] * x0
        attn_out = self.attn_scale * self.attn(tg.rms_norm(x) * self.norm_scale)
        if self.parallel:
            return x + attn_out + self.mlp_scale * self.mlp(tg.rms_norm(x) * self.norm_scale)
        x = x + attn_out
        return x + self.mlp_scale * self.mlp(tg.rms_norm(x) * self.norm_scale)


class UnbankedGPT(nn.Module):
    """Same architecture and state-dict names as tg.GPT, one nn.Linear per matrix."""

    def __init__(self, cfg):
        super().__init__()
        self.softcap = cfg.LOGIT_SOFTCAP
        self.tok_emb = nn.Embedding(cfg.VOCAB_SIZE, cfg.MODEL_DIM)
        self.blocks = nn.ModuleList(UnbankedBlock(cfg, i) for i in range(cfg.NUM_LAYERS))
        self.plain_order, self.loop_order = list(range(cfg.NUM_LAYERS)), tg.looped_layer_order(cfg)
        self.looping = False
        num_skips = len(self.loop_order) // 2
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.MODEL_DIM))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, cfg.MODEL_DIM))

    def forward(self, input_ids, target_ids):
        x = x0 = tg.rms_norm(self.tok_emb(input_ids))
        order = self.loop_order if self.looping else self.plain_order
        n_encoder = len(order) // 2
        skips = []
        for layer in order[:n_encoder]:
            x = self.blocks[layer](x, x0)
            skips.append(x)
        for slot, layer in enumerate(order[n_encoder:]):
            if skips:
                gate = torch.sigmoid(self.skip_gates[slot])
                x = gate * x + (1 - gate) * self.skip_weights[slot] * skips.pop()
            x = self.blocks[layer](x, x0)
        logits = F.linear(tg.rms_norm(x), self.tok_emb.weight).float()
        if self.softcap > 0:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return tg.token_nll(logits, target_ids)


class ReplicatedMuon(torch.optim.Optimizer):
    """Nesterov momentum, MuonEq-R, Newton-Schulz, shape scale and decoupled weight decay, one
    matrix at a time, on gradients every rank already holds averaged."""

    def __init__(self, params, lr, momentum, weight_decay, row_normalize, coeffs):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.row_normalize, self.coeffs = row_normalize, coeffs

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(mu).add_(p.grad)
                update = tg.muon_direction(p.grad.add(buf, alpha=mu), self.row_normalize, self.coeffs)
                p.mul_(1 - lr * wd).add_(update.to(p.dtype), alpha=-lr)


def bank_named_grads(model: tg.GPT):
    """(state-dict name, gradient) of every weight of the banked model, banks sliced per matrix."""
    for name, p in model.named_parameters():
        if name in model.layout:
            yield from zip(model.layout[name], p.grad)
        else:
            yield name, p.grad


def replicated_optimizers(cfg, model: UnbankedGPT):
    """The foundation's optimizer split: Muon for every block Linear, AdamW for the rest."""
    matrices = [m.weight for m in model.blocks.modules() if isinstance(m, nn.Linear)]
    matrix_ids = {id(p) for p in matrices} | {id(model.tok_emb.weight)}
    controls = [p for p in model.parameters() if id(p) not in matrix_ids]
    adam = torch.optim.AdamW([dict(params=[model.tok_emb.weight], lr=cfg.TIED_EMBED_LR, weight_decay=cfg.EMBED_WD),
                              dict(params=controls, lr=cfg.SCALAR_LR, weight_decay=cfg.ADAM_WD)],
                             betas=(cfg.BETA1, cfg.BETA2), eps=cfg.ADAM_EPS)
    muon = ReplicatedMuon(matrices, cfg.MATRIX_LR, cfg.MUON_MOMENTUM, cfg.MUON_WD, bool(cfg.MUON_ROW_NORMALIZE),
                          tg.newton_schulz_coeffs(cfg.MUON_NS_COEFFS, cfg.MUON_BACKEND_STEPS))
    return adam, muon


def replicated_step(cfg, model: UnbankedGPT, adam, muon) -> float:
    """The foundation's step on one process: clip to the global norm, then AdamW and Muon."""
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()),
                                          cfg.GRAD_CLIP_NORM) if cfg.GRAD_CLIP_NORM > 0 else None
    adam.step()
    muon.step()
    model.zero_grad(set_to_none=True)
    return norm


# A small problem for comparing the banked trainer with these references: 3 layers make the MLP
# banks hold 3 matrices, which 2 ranks cannot split evenly; the clip is low enough to bind.
PROBLEM_KNOBS = dict(PRESET="r1081", VOCAB_SIZE="97", NUM_LAYERS="3", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="8",
                     XSA_LAST_N="3", NUM_LOOPS="1", LOOP_START="1", LOOP_END="1", PARALLEL_RESIDUAL_START="2",
                     MLP_MULT="2", TRAIN_SEQ_LEN="16", TRAIN_BATCH_TOKENS="128", GRAD_CLIP_NORM="0.05",
                     MATRIX_LR="0.05", SCALAR_LR="0.05", TIED_EMBED_LR="0.05")
PROBLEM_STEPS = 4


def small_training_problem():
    """(config, banked model with randomized weights, global batches), the same in every process."""
    cfg = tg.config_from_env(PROBLEM_KNOBS)
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialized projections must carry gradient too
            p.add_(torch.randn_like(p) * 0.05)
    model.looping = True
    tokens = torch.randint(0, cfg.VOCAB_SIZE, (PROBLEM_STEPS, 8, cfg.TRAIN_SEQ_LEN + 1),
                           generator=torch.Generator().manual_seed(1))
    return cfg, model, list(tokens)
