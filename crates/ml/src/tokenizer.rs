//! Loading Hugging Face tokenizers and building the byte-level tokenizer of the tiny model.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::chat::ChatTemplate;
use crate::error::MlError;

/// Beginning-of-sequence token of the byte-level tokenizer.
pub const BOS_TOKEN: &str = "<s>";
/// End-of-sequence token of the byte-level tokenizer.
pub const EOS_TOKEN: &str = "</s>";
/// Padding token of the byte-level tokenizer.
pub const PAD_TOKEN: &str = "<pad>";
/// Vocabulary size of the byte-level tokenizer: 256 bytes plus `<s>`, `</s>`, `<pad>`.
pub const BYTE_VOCAB_SIZE: usize = 259;

/// A tokenizer loaded from a `tokenizer.json`.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    /// How conversations are rendered: the model's template, or the plain one.
    chat: std::sync::Arc<ChatTemplate>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<TextTokenizer, MlError> {
        if !path.is_file() {
            return Err(MlError::Tokenizer {
                path: path.to_path_buf(),
                problem: "file not found; the model directory must hold a tokenizer.json".into(),
            });
        }
        let inner = Tokenizer::from_file(path).map_err(|e| MlError::Tokenizer {
            path: path.to_path_buf(),
            problem: format!("cannot load: {e}"),
        })?;
        Ok(TextTokenizer {
            inner,
            path: path.to_path_buf(),
            chat: std::sync::Arc::new(ChatTemplate::plain("", "")),
        })
    }

    /// Renders conversations with `chat` from now on.
    pub fn with_chat(mut self, chat: ChatTemplate) -> TextTokenizer {
        self.chat = std::sync::Arc::new(chat);
        self
    }

    /// How conversations are rendered for this model.
    pub fn chat(&self) -> &ChatTemplate {
        &self.chat
    }

    /// Text of one token id (special tokens included), if the id exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Token ids of `text`, without any special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, MlError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| self.err(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are skipped when `skip_special` is set.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, MlError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| self.err(format!("cannot decode ids: {e}")))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn err(&self, problem: String) -> MlError {
        MlError::Tokenizer {
            path: self.path.clone(),
            problem,
        }
    }
}

/// The GPT-2 byte-to-character mapping used by byte-level BPE.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap_or('\u{FFFD}')
}

/// Writes a byte-level BPE `tokenizer.json` (ids 0-255 are the bytes, then `<s>`, `</s>`,
/// `<pad>`; no merges) to `path`.
pub fn write_byte_tokenizer(path: &Path) -> Result<(), MlError> {
    let err = |problem: String| MlError::Tokenizer {
        path: path.to_path_buf(),
        problem,
    };
    let vocab: [(String, u32); 256] =
        std::array::from_fn(|i| (byte_char(i as u8).to_string(), i as u32));
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .map_err(|e| err(format!("cannot build byte-level BPE: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    tok.add_special_tokens([
        AddedToken::from(BOS_TOKEN, true),
        AddedToken::from(EOS_TOKEN, true),
        AddedToken::from(PAD_TOKEN, true),
    ])
    .map_err(|e| err(format!("cannot add special tokens: {e}")))?;
    if tok.get_vocab_size(true) != BYTE_VOCAB_SIZE {
        return Err(err(format!(
            "byte-level tokenizer has {} ids, expected {BYTE_VOCAB_SIZE}",
            tok.get_vocab_size(true)
        )));
    }
    tok.save(path, true)
        .map_err(|e| err(format!("cannot write: {e}")))
}
