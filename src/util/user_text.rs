//! A check for messages a user can meet (status messages, CLI errors): they must speak of
//! what happened in the user's terms, never name an internal function, type or Rust path.
//!
//! Test-only; owns nothing and must never judge wording beyond the internal names it can
//! recognize (`a::b`, `name(…)`, `snake_case` identifiers).

/// The first internal name in `message`, if any: a Rust path (`store::apply`), a call
/// (`watch_since(4)`), or a `snake_case` identifier. What the user types or edits is
/// quoted in backticks (commands, `manager.conf` keys) and not judged; flags (`--if-version`)
/// are fine anywhere.
pub(crate) fn internal_name(message: &str) -> Option<String> {
    let unquoted: String = message.split('`').step_by(2).collect::<Vec<_>>().join(" ");
    unquoted
        .split_whitespace()
        .map(|word| word.trim_matches(|c: char| ",;:.!?\"'".contains(c)))
        .filter(|word| !word.starts_with('-'))
        .find(|word| word.contains("::") || is_call(word) || is_snake(word))
        .map(str::to_string)
}

fn is_identifier_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `name(` with an identifier right before the parenthesis.
fn is_call(word: &str) -> bool {
    word.char_indices().any(|(at, c)| {
        c == '('
            && word[..at]
                .chars()
                .next_back()
                .is_some_and(is_identifier_char)
    })
}

/// A word holding an identifier with an underscore between letters or digits.
fn is_snake(word: &str) -> bool {
    word.split(|c: char| !is_identifier_char(c)).any(|part| {
        let inner = part.trim_matches('_');
        inner.contains('_') && inner.chars().any(char::is_alphabetic)
    })
}

/// Panics naming the internal name `message` contains, if any.
pub(crate) fn assert_user_terms(message: &str) {
    if let Some(name) = internal_name(message) {
        panic!("the message names {name:?}, an internal name: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_names_are_found_and_user_words_pass() {
        assert_eq!(
            internal_name("split it with store::split_into_transactions").as_deref(),
            Some("store::split_into_transactions")
        );
        assert_eq!(
            internal_name("resume with watch_since(31166) and go").as_deref(),
            Some("watch_since(31166)")
        );
        assert_eq!(
            internal_name("re-read the store with view_and_watch").as_deref(),
            Some("view_and_watch")
        );
        assert_eq!(internal_name("call f(x) now").as_deref(), Some("f(x)"));
        for fine in [
            "no manager has id 1f; `flotilla manager ls` lists them",
            "pass --if-version 3 or --task-history-retention 5 (e.g. 250ms)",
            "unix:/tmp/x/control.sock closed the connection (it stopped?)",
            "change `listen_addr` in `m1/manager.conf`, or run `flotilla up` (e.g. now)",
        ] {
            assert_eq!(internal_name(fine), None, "{fine}");
        }
    }
}
