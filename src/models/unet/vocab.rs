//! The word-level prompt tokenizer over the portrait vocabulary.

use std::collections::{BTreeSet, HashMap};

use candle_core::{Device, Tensor};

use crate::data::portrait::{Accessory, Attributes, Background, Expression, HeadTurn, Lighting};

use super::Result;

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// A word-level prompt tokenizer over a fixed vocabulary. Ids 0, 1 and 2 are `<pad>`, `<unk>`
/// and `<bos>`; words follow in the order given. Text is lower-cased and split at every
/// character that is not a letter or digit (commas, whitespace, punctuation).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptVocab {
    pub(crate) words: Vec<String>,
    pub(crate) index: HashMap<String, u32>,
    pub(crate) max_tokens: usize,
}

impl PromptVocab {
    /// Padding id.
    pub const PAD: u32 = 0;
    /// Id of words outside the vocabulary.
    pub const UNK: u32 = 1;
    /// Id of the token that starts every prompt (the whole of the empty prompt).
    pub const BOS: u32 = 2;

    /// A vocabulary of `words` (lower-cased, duplicates dropped) encoding to `max_tokens` ids.
    pub fn new<S: AsRef<str>>(words: impl IntoIterator<Item = S>, max_tokens: usize) -> Self {
        let mut all: Vec<String> = vec!["<pad>".into(), "<unk>".into(), "<bos>".into()];
        let mut index: HashMap<String, u32> = all
            .iter()
            .enumerate()
            .map(|(i, w)| (w.clone(), i as u32))
            .collect();
        for w in words {
            let w = w.as_ref().to_lowercase();
            if w.is_empty() || index.contains_key(&w) {
                continue;
            }
            index.insert(w.clone(), all.len() as u32);
            all.push(w);
        }
        Self {
            words: all,
            index,
            max_tokens: max_tokens.max(1),
        }
    }

    /// Every word [`Attributes::prompt`] can write (collected from all attribute
    /// combinations, sorted), plus a few generic portrait words.
    pub fn portraits(max_tokens: usize) -> Self {
        let mut set = BTreeSet::new();
        for &expression in Expression::ALL {
            for &head_turn in HeadTurn::ALL {
                for &background in Background::ALL {
                    for &lighting in Lighting::ALL {
                        for &accessory in Accessory::ALL {
                            let a = Attributes {
                                expression,
                                head_turn,
                                background,
                                lighting,
                                accessory,
                            };
                            set.extend(Self::tokenize(&a.prompt()));
                        }
                    }
                }
            }
        }
        let extra = ["a", "photo", "portrait", "of", "person", "with", "and"];
        set.extend(extra.iter().map(|w| w.to_string()));
        Self::new(set, max_tokens)
    }

    /// The words of `text`: lower-case, split at non-alphanumeric characters.
    pub fn tokenize(text: &str) -> Vec<String> {
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    }

    /// Number of ids (special tokens included).
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether the vocabulary holds no ids (never: the special tokens are always there).
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Ids per encoded prompt.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The id of `word` (lower-cased), or [`Self::UNK`].
    pub fn id(&self, word: &str) -> u32 {
        self.index
            .get(&word.to_lowercase())
            .copied()
            .unwrap_or(Self::UNK)
    }

    /// The word of `id`, if any.
    pub fn word(&self, id: u32) -> Option<&str> {
        self.words.get(id as usize).map(String::as_str)
    }

    /// `[<bos>, word ids…, <pad>…]`, exactly `max_tokens` long (extra words are dropped).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![Self::BOS];
        ids.extend(Self::tokenize(text).iter().map(|w| self.id(w)));
        ids.truncate(self.max_tokens);
        ids.resize(self.max_tokens, Self::PAD);
        ids
    }

    /// Ids (B, T) u32 and mask (B, T) f32 (1 for tokens, 0 for padding) of several prompts.
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        prompts: &[S],
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let t = self.max_tokens;
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|p| self.encode(p.as_ref()))
            .collect();
        let mask: Vec<f32> = ids
            .iter()
            .map(|&i| if i == Self::PAD { 0.0 } else { 1.0 })
            .collect();
        let b = prompts.len();
        Ok((
            Tensor::from_vec(ids, (b, t), device)?,
            Tensor::from_vec(mask, (b, t), device)?,
        ))
    }
}
