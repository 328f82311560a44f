"""Hugging Face BERT checkpoints <-> jaxclf model directories: the one package that owns the HF mapping.

    import_hf("path/to/bert-dir", "models/imported", labels=["neg", "pos"])   # HF -> model directory
    export_hf("runs/default/model", "exported/")                             # model directory -> HF

Import reads `config.json`, `model.safetensors` (or a sharded `model.safetensors.index.json`)
and `tokenizer.json` or `vocab.txt` (+ `tokenizer_config.json`), of a `BertModel`,
`BertForSequenceClassification`, `BertForMaskedLM`/`BertForPreTraining` (their pretraining
heads are dropped) or sentence-transformers checkpoint. The mapping is exact or refused:

    HF config.json                 jaxclf ModelConfig
    hidden_size                    d_model
    num_attention_heads            nhead
    num_hidden_layers              num_encoder_layers
    intermediate_size              dim_feedforward
    max_position_embeddings        max_position_embeddings (learned; only "absolute" is accepted)
    type_vocab_size                type_vocab_size
    hidden_act gelu / gelu_new,    activation gelu (erf) / gelu_tanh / relu
      gelu_pytorch_tanh / relu
    layer_norm_eps                 layer_norm_eps (post-LN: norm_first=False)
    hidden_dropout_prob            dropout (classifier_dropout is not mapped: training only)
    attention_probs_dropout_prob   attention_dropout
    pad_token_id                   pad_token_id (must be the tokenizer's pad token)
    id2label                       id2label

Tensor names are HF's with or without the `bert.` prefix (old `LayerNorm.gamma/beta` accepted);
the model directory stores them without it, in the same (PyTorch) layout, so import is a
rename and never a transpose. `embeddings.position_ids` (a buffer) is dropped.

Pooling: a classifier checkpoint or a bare BertModel keeps BERT's pooler (pooling="pooler");
a sentence-transformers checkpoint takes the pooling its `1_Pooling/config.json` declares
("mean" or "cls"), and its unused BERT pooler is dropped. Without a classifier head, --labels
(or --num-classes) adds a freshly initialised one.

Tokenizer truncation: --max-length if given (at most max_position_embeddings), else
min(max_position_embeddings, tokenizer_config model_max_length, sentence-transformers
max_seq_length); saved inside tokenizer.json.

Export writes a `BertForSequenceClassification` directory; only models that are BERT
(post-LN, learned positions, pooling="pooler") are exported. A model without token types
(type_vocab_size=0) is exported with one all-zero token-type row, which adds nothing. A calibrated
model's temperature is folded into the classifier weight and bias (BERT has no temperature), so the
exported logits are the calibrated ones.

Pickle checkpoints (`pytorch_model.bin`) are refused, not unpickled: loading never runs code.

Where each part lives: `checkpoint` reads an HF directory (where it is, config.json, the tensors,
the sentence-transformers layout), `tokenizer` builds and checks its tokenizer and truncation,
`importing` writes the model directory (import_hf), `exporting` writes the HF directory (export_hf).
"""

from jaxclf.hf.checkpoint import HFCheckpointError
from jaxclf.hf.exporting import export_hf
from jaxclf.hf.importing import import_hf

__all__ = ["HFCheckpointError", "export_hf", "import_hf"]
