"""LDM BERT parity against diffusers: our ``TransformerEmbedder``, loaded from a tiny original-layout file,
against diffusers' ``LDMBertModel`` built by ``create_ldm_bert_config`` and ``convert_ldm_bert_checkpoint``
(``diffusers.pipelines.stable_diffusion.convert_from_ckpt``) from the same tensors, and our token ids
against the ones diffusers' ``LDMTextToImagePipeline`` makes with ``BertTokenizerFast``.

Where diffusers departs from the original, the test follows the original:
- ``convert_ldm_bert_checkpoint`` reads module attributes (``checkpoint.transformer.token_emb.weight``,
  ``attn_layers.layers[i][0]``...), the original ``BERTEmbedder``'s; diffusers' own
  ``download_from_original_stable_diffusion_ckpt`` passes it the flat state dict, which has none. The
  test hands it a stand-in object built from the file's ``cond_stage_model.*`` tensors.
- ``LDMBertConfig``'s dropout (0.1) is only active in training; the converter puts the model in eval mode.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

diffusers_convert = pytest.importorskip("diffusers.pipelines.stable_diffusion.convert_from_ckpt")
from transformers import BertTokenizerFast  # noqa: E402

from tests.builders import ldm_text  # noqa: E402

pytestmark = pytest.mark.parity

PROMPTS = ["A photo of a red cat, with the big dog.", "", "painting of a blue house in the sunset " * 12]


class StandIn:
    """The original module tree as attributes and indices over a flat state dict: ``node.a.b``,
    ``node[0]``, ``node[2:4]``; leaves are ``nn.Parameter``s (the converter assigns them to modules)."""

    def __init__(self):
        self.children: dict[str, object] = {}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str) -> "StandIn":
        root = cls()
        for key, tensor in state.items():
            if not key.startswith(prefix):
                continue
            *path, leaf = key[len(prefix):].split(".")
            node = root
            for part in path:
                node = node.children.setdefault(part, cls())
            node.children[leaf] = torch.nn.Parameter(tensor.clone(), requires_grad=False)
        return root

    def __getattr__(self, name: str):
        try:
            return self.__dict__["children"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.children[str(i)] for i in range(*index.indices(len(self.children)))]
        return self.children[str(index)]

    def __len__(self) -> int:
        return len(self.children)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    files = ldm_text.write(tmp_path_factory.mktemp("ldm_bert"), kind="kl")  # vocab.txt beside it
    folder, path, preset = files.path.parent, files.path, files.preset
    loaded = files.load()
    original_config = OmegaConf.create({"model": {"params": {"cond_stage_config": {
        "target": "ldm.modules.encoders.modules.BERTEmbedder",
        "params": {"n_embed": preset.model.cond_stage.dim, "n_layer": preset.model.cond_stage.depth}}}}})
    config = diffusers_convert.create_ldm_bert_config(original_config)
    standin = StandIn.from_state(load_file(str(path)), "cond_stage_model.")
    bert = diffusers_convert.convert_ldm_bert_checkpoint(standin, config)
    # diffusers' pipeline tokenizer: BertTokenizerFast for bert-base-uncased (here the tiny vocab.txt).
    tokenizer = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    return loaded, bert, tokenizer


def test_the_converted_diffusers_model_has_ldm_berts_fixed_heads():
    config = diffusers_convert.create_ldm_bert_config(OmegaConf.create(
        {"model": {"params": {"cond_stage_config": {"params": {"n_embed": 1280, "n_layer": 32}}}}}))
    assert (config.d_model, config.encoder_layers, config.encoder_ffn_dim) == (1280, 32, 5120)
    assert (config.encoder_attention_heads, config.head_dim, config.max_position_embeddings) == (8, 64, 77)
    assert (ldm_text.BERT["heads"], ldm_text.BERT["head_dim"]) == (8, 64)


def test_token_ids_equal_diffusers_pipelines(setup):
    loaded, _, tokenizer = setup
    ours = loaded.model.cond_stage_model.tokenizer.encode_batch(PROMPTS)
    # LDMTextToImagePipeline.__call__: tokenizer(prompt, padding="max_length", max_length=77, truncation=True)
    theirs = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours, theirs)
    assert ours[2, -1] == tokenizer.sep_token_id  # the long prompt is cut, [SEP] kept
    assert (ours[1, 2:] == 0).all()


def test_ldm_bert_embeddings_match_diffusers(setup):
    loaded, bert, tokenizer = setup
    ids = loaded.model.cond_stage_model.tokenizer.encode_batch(PROMPTS)
    with torch.no_grad():
        ours = loaded.model.cond_stage_model(ids)
        theirs = bert(ids)[0]  # the pipeline takes [0], the last hidden state after the final layer norm
    assert ours.shape == theirs.shape == (3, 77, 32)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert ours.std() > 0.5  # not a degenerate comparison
