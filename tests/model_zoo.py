"""Breadth model zoo: small, randomly initialised architectures for tests.

``ZOO`` maps a name to a zero-argument factory returning
``(model.eval(), example_inputs)`` where ``example_inputs`` is a positional
tuple (``model(*example_inputs)``).  Every model is tiny (hidden ~32-64, 2
layers, short sequences) so it runs well under a second on CPU and exports
with ``torch.export.export(model, inputs, strict=False)``.

No downloads: transformers models are built from config objects.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ZOO"]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _hf(cls, config, attn: str = "sdpa"):
    """Build a transformers model from ``config`` with the requested attention
    backend, falling back to eager; disables the KV cache."""
    if hasattr(config, "use_cache"):
        config.use_cache = False
    for impl in (attn, "eager"):
        try:
            config._attn_implementation = impl
            model = cls(config)
            break
        except (ValueError, ImportError, TypeError):
            continue
    else:  # pragma: no cover
        model = cls(config)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval()


def _ids(batch: int, seq: int, vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # avoid id 0 (usually pad) so inputs are never all-zero-ish
    return torch.randint(1, vocab, (batch, seq), dtype=torch.int64, generator=g)


def _padded_mask(batch: int, seq: int) -> torch.Tensor:
    """int64 mask of ones with trailing padding zeros on rows >= 1."""
    mask = torch.ones(batch, seq, dtype=torch.int64)
    for b in range(1, batch):
        mask[b, seq - 2 * b :] = 0
    return mask


# --------------------------------------------------------------------------- #
# transformers architectures
# --------------------------------------------------------------------------- #
def bert_tiny_padded():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64,
    )
    model = _hf(BertModel, cfg)
    ids = _ids(2, 16, cfg.vocab_size)
    mask = _padded_mask(2, 16)  # second row ends with 2 padding zeros
    return model, (ids, mask)


def distilbert_tiny():
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    cfg = DistilBertConfig(
        vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
        max_position_embeddings=64,
    )
    model = _hf(DistilBertModel, cfg)
    ids = _ids(2, 16, cfg.vocab_size)
    mask = torch.ones(2, 16, dtype=torch.int64)
    return model, (ids, mask)


def roberta_tiny():
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=66, type_vocab_size=1,
    )
    model = _hf(RobertaModel, cfg)
    ids = _ids(2, 16, cfg.vocab_size)
    ids[ids == cfg.pad_token_id] = 5  # keep position ids simple (no pad tokens)
    mask = torch.ones(2, 16, dtype=torch.int64)
    return model, (ids, mask)


def vit_tiny():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, num_channels=3,
    )
    model = _hf(ViTModel, cfg)
    pixel_values = torch.randn(2, 3, 32, 32)
    return model, (pixel_values,)


def t5_encoder_tiny():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=64,
        feed_forward_proj="relu",
    )
    model = _hf(T5EncoderModel, cfg)
    ids = _ids(2, 16, cfg.vocab_size)
    mask = torch.ones(2, 16, dtype=torch.int64)
    return model, (ids, mask)


def llama_gqa_tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,  # GQA
        max_position_embeddings=128, rms_norm_eps=1e-6, use_cache=False,
        tie_word_embeddings=False,
    )
    model = _hf(LlamaForCausalLM, cfg)
    ids = _ids(2, 16, cfg.vocab_size)
    return model, (ids,)


def gpt2_tiny():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4, use_cache=False,
        bos_token_id=1, eos_token_id=1,
    )
    # NOTE: eager attention on purpose.  With attn_implementation="sdpa",
    # torch.export succeeds but ep.run_decompositions() (default table) fails:
    # the SDPA math decomposition yields an output whose strides differ from the
    # fused op's meta, so GPT-2's ``attn_output.reshape(...).contiguous()`` (the
    # .contiguous() is elided at trace time) followed by Conv1D's ``x.view(-1, C)``
    # raises "Cannot view a tensor with shape [B, S, C] and strides ...".
    # Known upstream: pytorch/pytorch#136543, #141107.
    model = _hf(GPT2LMHeadModel, cfg, attn="eager")
    ids = _ids(2, 16, cfg.vocab_size)
    return model, (ids,)


class WhisperEncoderWrapper(nn.Module):
    """Whisper encoder (from ``WhisperModel``) taking ``input_features``
    positionally and returning the last hidden state."""

    def __init__(self, whisper_model: nn.Module):
        super().__init__()
        self.encoder = whisper_model.get_encoder()
        self.config = whisper_model.config

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_features).last_hidden_state


def whisper_encoder_tiny():
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=1000, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_source_positions=32, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
        suppress_tokens=[], begin_suppress_tokens=[], use_cache=False,
    )
    full = _hf(WhisperModel, cfg)
    model = WhisperEncoderWrapper(full).eval()
    # encoder requires input length == 2 * max_source_positions (conv stride 2)
    feats = torch.randn(2, cfg.num_mel_bins, 2 * cfg.max_source_positions)
    return model, (feats,)


# --------------------------------------------------------------------------- #
# hand-written torch.nn architectures
# --------------------------------------------------------------------------- #
class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.use_res = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False),  # linear bottleneck
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2Tiny(nn.Module):
    # (expand, out_channels, repeats, stride)
    CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 1, 2)]

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True),
        ]
        c = 16
        for t, oc, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(c, oc, s if i == 0 else 1, t))
                c = oc
        layers += [nn.Conv2d(c, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def mobilenetv2_tiny():
    torch.manual_seed(0)
    return MobileNetV2Tiny().eval(), (torch.randn(2, 3, 64, 64),)


class _UNetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
        )

    def forward(self, x):
        return self.net(x)


class UNetTiny(nn.Module):
    def __init__(self, cin: int = 3, cout: int = 2, base: int = 16):
        super().__init__()
        self.enc1 = _UNetBlock(cin, base)
        self.enc2 = _UNetBlock(base, base * 2)
        self.mid = _UNetBlock(base * 2, base * 4)
        self.up2 = nn.ConvTranspose2d(base * 4, base * 2, 2, stride=2)
        self.dec2 = _UNetBlock(base * 4, base * 2)
        self.up1 = nn.ConvTranspose2d(base * 2, base, 2, stride=2)
        self.dec1 = _UNetBlock(base * 2, base)
        self.out = nn.Conv2d(base, cout, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


def unet_tiny():
    torch.manual_seed(0)
    return UNetTiny().eval(), (torch.randn(1, 3, 32, 32),)


class LSTMClassifier(nn.Module):
    def __init__(self, vocab: int = 500, emb: int = 32, hidden: int = 64, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.fc(out[:, -1, :])


def lstm_classifier():
    torch.manual_seed(0)
    return LSTMClassifier().eval(), (_ids(2, 12, 500),)


class GRUModel(nn.Module):
    """2-layer GRU sequence regressor on continuous features; per-step head
    plus a broadcast term from the final hidden state."""

    def __init__(self, feat: int = 16, hidden: int = 32, out: int = 4):
        super().__init__()
        self.gru = nn.GRU(feat, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        out, h = self.gru(x)
        return self.head(out) + self.head(h[-1]).unsqueeze(1)


def gru_model():
    torch.manual_seed(0)
    return GRUModel().eval(), (torch.randn(2, 10, 16),)


def _conv_bn_silu(cin, cout, k=3, s=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class YoloTiny(nn.Module):
    """YOLO-style detector: SiLU conv backbone, FPN-ish top-down path with
    nearest upsampling + concat, and per-scale heads reshaped to
    (B, anchors*H*W, 5+classes)."""

    def __init__(self, num_classes: int = 3, anchors: int = 3):
        super().__init__()
        self.na = anchors
        self.no = 5 + num_classes
        self.stem = _conv_bn_silu(3, 16, 3, 2)      # /2
        self.c2 = _conv_bn_silu(16, 32, 3, 2)       # /4
        self.c3 = _conv_bn_silu(32, 64, 3, 2)       # /8  -> P3
        self.c4 = _conv_bn_silu(64, 64, 3, 2)       # /16 -> P4
        self.lat = _conv_bn_silu(64, 32, 1, 1)
        self.fuse = _conv_bn_silu(32 + 64, 64, 3, 1)
        self.head_p3 = nn.Conv2d(64, self.na * self.no, 1)
        self.head_p4 = nn.Conv2d(64, self.na * self.no, 1)

    def _decode(self, x):
        b, _, h, w = x.shape
        x = x.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous()
        return torch.sigmoid(x).view(b, self.na * h * w, self.no)

    def forward(self, x):
        p3 = self.c3(self.c2(self.stem(x)))
        p4 = self.c4(p3)
        up = F.interpolate(self.lat(p4), scale_factor=2.0, mode="nearest")
        p3f = self.fuse(torch.cat([up, p3], dim=1))
        return torch.cat([self._decode(self.head_p3(p3f)), self._decode(self.head_p4(p4))], dim=1)


def yolo_tiny():
    torch.manual_seed(0)
    return YoloTiny().eval(), (torch.randn(1, 3, 64, 64),)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10),
        )

    def forward(self, x):
        return self.net(x)


def small_cnn():
    torch.manual_seed(0)
    return SmallCNN().eval(), (torch.randn(2, 1, 28, 28),)


class SpeechConv1d(nn.Module):
    """1-D conv speech net: Conv1d front-end + (LayerNorm, GELU) blocks over
    channels-last features, mean-pooled classifier."""

    def __init__(self, mels: int = 16, ch: int = 48, classes: int = 12):
        super().__init__()
        self.conv1 = nn.Conv1d(mels, ch, 5, stride=2, padding=2)
        self.norm1 = nn.LayerNorm(ch)
        self.conv2 = nn.Conv1d(ch, ch, 3, padding=1, groups=4)
        self.norm2 = nn.LayerNorm(ch)
        self.fc = nn.Linear(ch, classes)

    def forward(self, x):  # x: (B, mels, T)
        h = self.conv1(x)
        h = F.gelu(self.norm1(h.transpose(1, 2))).transpose(1, 2)
        h = h + F.gelu(self.norm2(self.conv2(h).transpose(1, 2))).transpose(1, 2)
        return self.fc(h.mean(dim=2))


def speech_conv1d():
    torch.manual_seed(0)
    return SpeechConv1d().eval(), (torch.randn(2, 16, 40),)


ZOO: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "bert_tiny_padded": bert_tiny_padded,
    "distilbert_tiny": distilbert_tiny,
    "roberta_tiny": roberta_tiny,
    "vit_tiny": vit_tiny,
    "t5_encoder_tiny": t5_encoder_tiny,
    "llama_gqa_tiny": llama_gqa_tiny,
    "gpt2_tiny": gpt2_tiny,
    "whisper_encoder_tiny": whisper_encoder_tiny,
    "mobilenetv2_tiny": mobilenetv2_tiny,
    "unet_tiny": unet_tiny,
    "lstm_classifier": lstm_classifier,
    "gru_model": gru_model,
    "yolo_tiny": yolo_tiny,
    "small_cnn": small_cnn,
    "speech_conv1d": speech_conv1d,
}
