//! Chat templates: conversations rendered the way the model was tuned to read them.
//!
//! An instruct model's `tokenizer_config.json` carries its chat template (Jinja, rendered
//! here with `minijinja` and Python-compatible string methods). A model without one gets a
//! plain template (`role: content` lines, the end-of-sequence token after each assistant
//! turn). Training masks the loss to the assistant turns: each assistant turn's span is
//! found by rendering the conversation up to it twice, with the generation prompt and with
//! the turn, so the template's own markup around a turn is never trained on. Miners,
//! validators and `tunenet train`/`eval` all tokenize through here, so they agree.

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::MlError;

/// One turn of a conversation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Turn {
    /// `system`, `user` or `assistant` (templates may know others, such as `tool`).
    pub role: String,
    /// What was said.
    pub content: String,
}

impl Turn {
    /// A turn of `role` saying `content`.
    pub fn new(role: &str, content: impl Into<String>) -> Turn {
        Turn {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// The template of models that ship none: one `role: content` line per turn, the
/// end-of-sequence token closing each assistant turn.
pub const PLAIN_TEMPLATE: &str = "{% for m in messages %}{% if m.role == 'assistant' %}assistant: {{ m.content }}{{ eos_token }}\n{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";

/// Name of the template inside the environment.
const NAME: &str = "chat";

/// Instructions one rendering may run. A model's chat template comes with the model, from
/// whoever published it; real ones take a few dozen instructions per turn, so this allows
/// conversations of thousands of turns and stops a template that loops (nested `range`s)
/// within milliseconds.
pub const TEMPLATE_FUEL: u64 = 2_000_000;

/// Longest rendering, in bytes: far beyond any record a model is trained or scored on, and
/// small enough that a template that writes a huge string many times stops early.
pub const MAX_RENDERED_BYTES: usize = 16 << 20;

/// A writer that refuses to grow past [`MAX_RENDERED_BYTES`] (and says so in `full`).
#[derive(Default)]
struct Capped {
    out: Vec<u8>,
    full: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > MAX_RENDERED_BYTES {
            self.full = true;
            return Err(std::io::Error::other("rendering too long"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A compiled chat template with the special tokens it refers to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Whether it is the model's own (false: [`PLAIN_TEMPLATE`]).
    own: bool,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("own", &self.own)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn special(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    fn compile(source: String, own: bool, bos: String, eos: String) -> Result<Self, MlError> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.set_trim_blocks(false);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| MlError::Invalid(format!("the chat template does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            source,
            own,
            bos,
            eos,
        })
    }

    /// The plain template, with these special tokens.
    pub fn plain(bos: &str, eos: &str) -> ChatTemplate {
        // The plain template is a constant that compiles.
        ChatTemplate::compile(PLAIN_TEMPLATE.into(), false, bos.into(), eos.into())
            .expect("the plain chat template compiles")
    }

    /// A template from its Jinja source.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate, MlError> {
        ChatTemplate::compile(source.into(), true, bos.into(), eos.into())
    }

    /// The chat template of a model directory: `chat_template` of its
    /// `tokenizer_config.json` (a string, or a list of named templates of which `default`
    /// is taken), else `chat_template.jinja` beside it; None when it has neither.
    /// `bos`/`eos` are the tokenizer's, used when the config names none.
    pub fn from_model_dir(
        dir: &Path,
        bos: &str,
        eos: &str,
    ) -> Result<Option<ChatTemplate>, MlError> {
        let cfg_path = dir.join("tokenizer_config.json");
        let (mut bos, mut eos) = (bos.to_string(), eos.to_string());
        let mut source = None;
        if cfg_path.is_file() {
            let bytes =
                std::fs::read(&cfg_path).map_err(|e| MlError::io("cannot read", &cfg_path, e))?;
            let cfg: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                MlError::Invalid(format!("{}: not valid JSON: {e}", cfg_path.display()))
            })?;
            if let Some(b) = special(cfg.get("bos_token")) {
                bos = b;
            }
            if let Some(e) = special(cfg.get("eos_token")) {
                eos = e;
            }
            source = match cfg.get("chat_template") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or(named.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                Some(other) => {
                    return Err(MlError::Invalid(format!(
                        "{}: chat_template must be a string or a list of named templates, found {other}",
                        cfg_path.display()
                    )));
                }
            };
        }
        let jinja = dir.join("chat_template.jinja");
        if source.is_none() && jinja.is_file() {
            source = Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|e| MlError::io("cannot read", &jinja, e))?,
            );
        }
        source
            .map(|s| {
                ChatTemplate::new(&s, &bos, &eos).map_err(|e| {
                    MlError::Invalid(format!("{} of {}: {e}", "chat template", dir.display()))
                })
            })
            .transpose()
    }

    /// Whether this is the model's own template (not the plain fallback).
    pub fn is_models_own(&self) -> bool {
        self.own
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The beginning-of-sequence token's text.
    pub fn bos_token(&self) -> &str {
        &self.bos
    }

    /// Whether a rendering already begins with the beginning-of-sequence token (some
    /// templates write it), so the tokenizer must not add another.
    pub fn writes_bos(&self, rendered: &str) -> bool {
        !self.bos.is_empty() && rendered.starts_with(&self.bos)
    }

    /// Renders `messages`, ending with the assistant's cue when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Turn],
        add_generation_prompt: bool,
    ) -> Result<String, MlError> {
        let t = self
            .env
            .get_template(NAME)
            .map_err(|e| MlError::Invalid(format!("chat template: {e}")))?;
        let mut out = Capped::default();
        t.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos,
                eos_token => &self.eos,
            },
            &mut out,
        )
        .map_err(|e| {
            if out.full {
                MlError::Invalid(format!(
                    "cannot render the chat template: its rendering would be over {MAX_RENDERED_BYTES} bytes"
                ))
            } else {
                MlError::Invalid(format!("cannot render the chat template: {e}"))
            }
        })?;
        String::from_utf8(out.out)
            .map_err(|e| MlError::Invalid(format!("the chat template rendered bad UTF-8: {e}")))
    }

    /// The rendered conversation cut into spans, each marked trained (an assistant turn,
    /// with the template's end-of-turn markup) or not (everything else). Joined, the spans
    /// are the whole rendering. Refused when the template does not render a conversation's
    /// beginning as a prefix of the whole (then no turn can be located), or when no
    /// assistant turn is found.
    pub fn segments(&self, messages: &[Turn]) -> Result<Vec<(String, bool)>, MlError> {
        let whole = self.render(messages, false)?;
        let mut out = Vec::new();
        let mut at = 0;
        for (i, turn) in messages.iter().enumerate() {
            if turn.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !whole.starts_with(&through) || before.len() < at {
                return Err(MlError::Invalid(format!(
                    "the chat template does not render turn {} as a continuation of the turns before it, so its assistant turns cannot be masked",
                    i + 1
                )));
            }
            if before.len() > at {
                out.push((whole[at..before.len()].to_string(), false));
            }
            if through.len() > before.len() {
                out.push((whole[before.len()..through.len()].to_string(), true));
            }
            at = through.len();
        }
        if !out.iter().any(|(_, trained)| *trained) {
            return Err(MlError::Invalid(
                "the conversation has no assistant turn to train on".into(),
            ));
        }
        if whole.len() > at {
            out.push((whole[at..].to_string(), false));
        }
        Ok(out)
    }
}
