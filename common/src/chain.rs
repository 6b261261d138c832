//! An error as one line for people: the error and every cause it wraps.

/// The error and all its sources, joined with `": "`; a cause whose text the message already
/// carries (an error that prints its source itself) is not repeated.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("applying the object")]
        Wrapping(#[source] std::io::Error),
        #[error("reading the object: {0}")]
        Printing(#[source] std::io::Error),
    }

    #[test]
    fn causes_are_joined_once() {
        let cause = || std::io::Error::other("permission denied");
        assert_eq!(
            error_chain(&Outer::Wrapping(cause())),
            "applying the object: permission denied"
        );
        assert_eq!(
            error_chain(&Outer::Printing(cause())),
            "reading the object: permission denied"
        );
    }
}
