//! Shell-style wildcard matching (`*` any run, `?` any one), shared by
//! command policies (over bytes) and TLS subject patterns (over characters,
//! with escapes). A leaf: it imports nothing of qmpmux.

/// What one element of a pattern stands for.
pub enum Pat<'a, T> {
    /// `*`: any run of elements, none included.
    Any,
    /// `?`: exactly one element.
    One,
    /// This element itself.
    Lit(&'a T),
}

/// Whether `text` matches `pattern`, whose elements `class` reads.
/// Iterative, with one backtrack point (the last `*`): linear in the common
/// case and O(pattern x text) at worst, never exponential.
pub fn matches<'p, P, T: PartialEq + 'p>(pattern: &'p [P], text: &[T], class: impl Fn(&'p P) -> Pat<'p, T>) -> bool {
    let (mut pi, mut si) = (0, 0);
    // After the last `*` seen: where the pattern resumes, and the text
    // position it was last tried at.
    let mut star: Option<(usize, usize)> = None;
    while si < text.len() {
        match pattern.get(pi).map(&class) {
            Some(Pat::Any) => {
                star = Some((pi + 1, si));
                pi += 1;
            }
            Some(Pat::One) => (pi, si) = (pi + 1, si + 1),
            Some(Pat::Lit(c)) if *c == text[si] => (pi, si) = (pi + 1, si + 1),
            _ => match star {
                // Let the `*` take one more element, and retry.
                Some((after, tried)) => {
                    (pi, si) = (after, tried + 1);
                    star = Some((after, tried + 1));
                }
                None => return false,
            },
        }
    }
    pattern[pi..].iter().all(|p| matches!(class(p), Pat::Any))
}
