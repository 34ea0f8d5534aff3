//! Kubernetes name rules (DNS-1123), shared by every validator of the spec.

/// A DNS-1123 label (a Canary's name, a namespace, a webhook's name): 1-63 lowercase letters,
/// digits or '-', starting and ending with a letter or digit.
pub(crate) fn is_dns_label(s: &str) -> bool {
    is_lowercase_word(s, 63)
}

/// A Kubernetes object name: a DNS-1123 subdomain, labels joined by '.', 253 characters at most.
pub(crate) fn is_object_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A Gateway API `SectionName` (a rule name): a label's characters, up to 253 of them.
pub(crate) fn is_section_name(s: &str) -> bool {
    is_lowercase_word(s, 253)
}

fn is_lowercase_word(s: &str, max_len: usize) -> bool {
    !s.is_empty()
        && s.len() <= max_len
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_object_names_and_section_names() {
        for good in ["a", "checkout", "v2-canary", &"a".repeat(63)] {
            assert!(is_dns_label(good), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_object_name("reviews.shop-v2"));
        assert!(!is_object_name("reviews..shop"));
        assert!(!is_object_name(&vec!["a".repeat(63); 4].join(".")));
        assert!(is_section_name(&"a".repeat(100)));
        assert!(!is_section_name("a.b"));
    }
}
