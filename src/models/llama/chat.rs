//! Turning one user message into a prompt.
//!
//! PLACEHOLDER for the integrator: [`render_user_prompt`] is to be replaced by the chat
//! template engine (minijinja, `src/data/`). Until then it writes ChatML, the format of the
//! built-in SmolLM2 (and Qwen2), taking a default system message from the template when the
//! template spells one out literally.

/// The prompt asking the model to answer `user` (generation prompt included).
///
/// PLACEHOLDER: a hard-coded ChatML rendering, not the template's own; replace with the
/// template engine.
pub fn render_user_prompt(template: Option<&str>, user: &str) -> String {
    const SYSTEM: &str = "<|im_start|>system\n";
    let system = template.and_then(|t| {
        let start = t.find(SYSTEM)?;
        let end = t[start..].find("<|im_end|>")? + start;
        Some(format!("{}<|im_end|>\n", &t[start..end]))
    });
    format!(
        "{}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
        system.unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_with_the_templates_default_system_message() {
        let t = "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% for m in messages %}";
        assert_eq!(
            render_user_prompt(Some(t), "Hi"),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            render_user_prompt(None, "Hi"),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
