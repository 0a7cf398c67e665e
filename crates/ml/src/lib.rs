//! tunenet-ml: the machine-learning side of tunenet. A Llama-family causal LM in candle
//! (Hugging Face checkpoints, sharded or not; GGUF import), LoRA and full fine-tuning with a
//! deadline-aware, resumable loop, evaluation (token loss, HellaSwag), synthetic test sets,
//! JSONL datasets, artifacts with embedded manifests (and PEFT adapters), tiny test models.
//! Nothing here touches the network: every model and dataset comes from local files.

pub mod alloc;
mod artifact;
mod bench;
mod chat;
mod checkpoint;
mod config;
mod data;
mod device;
mod error;
mod eval;
mod formats;
mod fused;
mod fused_block;
mod gguf;
mod hellaswag;
mod lm;
mod loader;
mod lora;
mod memory;
mod merge;
mod model;
mod model_dir;
mod parallel;
mod peft;
mod pgemm;
mod scoring;
mod simd;
mod st_write;
mod synthetic;
pub mod threads;
mod tiny;
mod tokenizer;
mod tp;
mod train;

pub use candle_core::{DType, Device};

pub use artifact::{
    ARTIFACT_FILE, ARTIFACT_FORMAT, ArtifactManifest, MANIFEST_FILE, MANIFEST_METADATA_KEY,
    MAX_HEADER_BYTES, read_artifact_manifest,
};
pub use bench::{BENCH_TEXT, BenchResult, BenchSpec, bench_linear_product, bench_throughput};
pub use chat::{ChatTemplate, PLAIN_TEMPLATE, Turn};
pub use checkpoint::CHECKPOINT_FILE;
pub use config::{LlamaConfig, RopeScaling, SUPPORTED_ARCHITECTURES, SUPPORTED_MODEL_TYPES};
pub use data::{
    Record, SHIPPED_INSTRUCT_JSONL, demo_canaries, demo_dataset, load_jsonl, parse_jsonl, to_jsonl,
};
pub use device::parse_device;
pub use error::MlError;
pub use eval::{EvalReport, RecordLosses, evaluate, evaluate_on, record_losses, record_losses_on};
pub use formats::{
    BadRecord, DatasetLoad, FieldMap, load_dataset, parquet_readers_running, parse_dataset,
    pause_parquet_reads_on_this_thread,
};
pub use gguf::{export_gguf, export_gguf_quantized, import_gguf};
pub use hellaswag::{
    DEFAULT_BATCH_TOKENS, HellaSwagItem, HellaSwagReport, ItemScore, ScoreOptions, ScoreProgress,
    evaluate_hellaswag, hellaswag_context, hellaswag_demo_items, hellaswag_preprocess,
    hellaswag_summary, item_scores_from_logliks, load_hellaswag, parse_hellaswag, score_items,
};
pub use lm::{CausalLm, TrainingTokens};
pub use loader::WeightDtype;
pub use lora::{ALL_LORA_TARGETS, DEFAULT_LORA_TARGETS};
pub use memory::{MemoryEstimate, estimate_memory, estimate_memory_with_targets, peak_rss_bytes};
pub use merge::merge_adapter;
pub use model_dir::{CONFIG_FILE, ModelDir, TOKENIZER_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE};
#[cfg(feature = "nccl")]
pub use parallel::NcclCollective;
pub use parallel::{Collective, RankComm, ThreadCollective, collective_for};
pub use peft::{PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, import_full_weights, import_peft_adapter};
pub use scoring::{Branch, GgufWeights, HellaSwagScorer, PackedGroup, ScoringModel};
pub use synthetic::{
    Generation, NEIGHBOUR_RATE, SamplingConfig, neighbour_set, rewrite_set, synthetic_set,
};
pub use tiny::{init_tiny, tiny_config};
pub use tokenizer::{BOS_TOKEN, BYTE_VOCAB_SIZE, EOS_TOKEN, PAD_TOKEN, TextTokenizer};
pub use tp::TensorParallelLm;
pub use train::{
    COSINE_FLOOR, LrSchedule, Method, Progress, TrainConfig, TrainReport, train,
    train_data_parallel, train_with_targets,
};
