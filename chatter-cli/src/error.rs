//! The one error type of the tool: what went wrong, and what to do about it.

use std::fmt;

/// An error for the user: a message and, when there is one, what to do about it.
#[derive(Debug)]
pub(crate) struct CliError {
    message: String,
    hints: Vec<String>,
}

impl CliError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            hints: Vec::new(),
        }
    }

    /// Adds a line saying what to do.
    pub(crate) fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hints.push(hint.into());
        self
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error: {}", self.message)?;
        for hint in &self.hints {
            for (i, line) in hint.lines().enumerate() {
                let lead = if i == 0 { "hint: " } else { "      " };
                write!(f, "\n{lead}{line}")?;
            }
        }
        Ok(())
    }
}
