//! Docker image references (checked by `flockerctl` when it reads a config and again by the
//! agent for every application it is sent): `repository[:tag]`, checked against Docker's reference grammar so
//! a typo is caught here rather than as a pull failure on some node later.
//!
//! The repository may start with a registry host (`registry.local:5000/team/app`). Digests
//! (`@sha256:...`) are refused: the wire model carries a tag, and a digest silently dropped
//! would run a different image than the one written.

use crate::Image;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("the image reference is empty")]
    Empty,
    #[error("invalid image reference {0:?}: it contains whitespace")]
    Whitespace(String),
    #[error("invalid image reference {0:?}: digests (`@...`) are not supported, give a tag")]
    Digest(String),
    #[error("invalid image reference {0:?}: repository names must be lowercase")]
    Uppercase(String),
    #[error(
        "invalid image reference {0:?}: each path component must be lowercase letters and \
         digits, separated by `.`, `_`, `__` or dashes"
    )]
    Component(String),
    #[error("invalid image reference {0:?}: invalid registry host {1:?}")]
    Host(String, String),
    #[error(
        "invalid image reference {0:?}: the tag must be 1 to 128 letters, digits, `_`, `.` or \
         `-`, not starting with `.` or `-`"
    )]
    Tag(String),
    #[error("invalid image reference {0:?}: the repository name is longer than 255 characters")]
    TooLong(String),
}

/// Splits and checks `repository[:tag]`; the tag defaults to `latest`.
pub fn parse_image(text: &str) -> Result<Image, ImageError> {
    let err_text = || text.to_owned();
    if text.is_empty() {
        return Err(ImageError::Empty);
    }
    if text.chars().any(char::is_whitespace) {
        return Err(ImageError::Whitespace(err_text()));
    }
    if text.contains('@') {
        return Err(ImageError::Digest(err_text()));
    }
    let last_slash = text.rfind('/').map_or(0, |i| i + 1);
    let (repository, tag) = match text[last_slash..].rfind(':') {
        Some(i) => (&text[..last_slash + i], &text[last_slash + i + 1..]),
        None => (text, "latest"),
    };
    if repository.is_empty() {
        return Err(ImageError::Empty);
    }
    if repository.len() > 255 {
        return Err(ImageError::TooLong(err_text()));
    }
    if !valid_tag(tag) {
        return Err(ImageError::Tag(err_text()));
    }
    let mut components: Vec<&str> = repository.split('/').collect();
    let first = components[0];
    if components.len() > 1 && (first.contains(['.', ':']) || first == "localhost") {
        if !valid_host(first) {
            return Err(ImageError::Host(err_text(), first.to_owned()));
        }
        components.remove(0);
    }
    for component in components {
        if component.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(ImageError::Uppercase(err_text()));
        }
        if !valid_path_component(component) {
            return Err(ImageError::Component(err_text()));
        }
    }
    Ok(Image {
        repository: repository.to_owned(),
        tag: tag.to_owned(),
    })
}

fn valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    (first.is_ascii_alphanumeric() || first == '_')
        && tag.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_host(host: &str) -> bool {
    let (name, port) = match host.split_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    if let Some(port) = port
        && (port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) || port.len() > 5)
    {
        return false;
    }
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    let mut expect_alnum = true;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            expect_alnum = false;
            continue;
        }
        if expect_alnum {
            return false;
        }
        let start = i;
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        debug_assert!(i > start);
        expect_alnum = true;
    }
    !bytes.is_empty() && !expect_alnum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> (String, String) {
        let image = parse_image(text).expect(text);
        (image.repository, image.tag)
    }

    #[test]
    fn accepts_docker_references() {
        assert_eq!(ok("redis"), ("redis".into(), "latest".into()));
        assert_eq!(ok("redis:7.2"), ("redis".into(), "7.2".into()));
        assert_eq!(
            ok("redis-flocker:latest"),
            ("redis-flocker".into(), "latest".into())
        );
        assert_eq!(
            ok("registry.local:5000/team/app_x:v1-rc.2"),
            ("registry.local:5000/team/app_x".into(), "v1-rc.2".into())
        );
        assert_eq!(
            ok("localhost/a__b--c"),
            ("localhost/a__b--c".into(), "latest".into())
        );
        assert_eq!(
            ok("Registry.Example.COM/x"),
            ("Registry.Example.COM/x".into(), "latest".into())
        );
    }

    #[test]
    fn refuses_bad_references() {
        assert_eq!(parse_image(""), Err(ImageError::Empty));
        assert_eq!(parse_image(":tag"), Err(ImageError::Empty));
        assert_eq!(
            parse_image("Redis"),
            Err(ImageError::Uppercase("Redis".into()))
        );
        assert_eq!(
            parse_image("re dis"),
            Err(ImageError::Whitespace("re dis".into()))
        );
        assert_eq!(parse_image("redis:"), Err(ImageError::Tag("redis:".into())));
        assert_eq!(
            parse_image("redis:-x"),
            Err(ImageError::Tag("redis:-x".into()))
        );
        assert_eq!(
            parse_image("redis@sha256:abc"),
            Err(ImageError::Digest("redis@sha256:abc".into()))
        );
        assert_eq!(
            parse_image("a//b"),
            Err(ImageError::Component("a//b".into()))
        );
        assert_eq!(
            parse_image("-redis"),
            Err(ImageError::Component("-redis".into()))
        );
        assert_eq!(
            parse_image("redis."),
            Err(ImageError::Component("redis.".into()))
        );
        assert_eq!(
            parse_image("a___b"),
            Err(ImageError::Component("a___b".into()))
        );
        assert!(matches!(
            parse_image("bad_host:5000x/a"),
            Err(ImageError::Host(..))
        ));
    }
}
