//! How cases say what they expected and what they saw.
use std::fmt::{self, Debug, Display};
use std::io;

/// Why a case did not pass.
#[derive(Debug)]
pub enum CaseError {
    /// What was expected and what was seen.
    Fail(String),
    /// The case cannot run in this environment; says why.
    Skip(String),
}

impl Display for CaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaseError::Fail(m) => write!(f, "{m}"),
            CaseError::Skip(m) => write!(f, "skipped: {m}"),
        }
    }
}

pub type CaseResult = Result<(), CaseError>;

pub fn fail(msg: impl Into<String>) -> CaseError {
    CaseError::Fail(msg.into())
}

/// Fails with the formatted message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err($crate::posix::check::fail(format!($($msg)+)));
        }
    };
}

/// Fails unless `seen == expected`, naming both.
macro_rules! ensure_eq {
    ($seen:expr, $expected:expr, $($what:tt)+) => {{
        let seen = $seen;
        let expected = $expected;
        if seen != expected {
            return Err($crate::posix::check::fail(format!(
                "{}: expected {:?}, saw {:?}",
                format!($($what)+),
                expected,
                seen
            )));
        }
    }};
}

pub(crate) use {ensure, ensure_eq};

/// Adds what was being done to an unexpected error.
pub trait Context<T> {
    fn ctx(self, what: impl Display) -> Result<T, CaseError>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, what: impl Display) -> Result<T, CaseError> {
        self.map_err(|e| fail(format!("{what}: expected success, saw {}", describe(&e))))
    }
}

/// The error's errno name and message, e.g. "EEXIST (File exists)".
pub fn describe(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{} ({e})", errno_name(n)),
        None => e.to_string(),
    }
}

pub fn errno_name(n: i32) -> String {
    let name = match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOLCK => "ENOLCK",
        _ => return format!("errno {n}"),
    };
    name.to_string()
}

fn names(errnos: &[i32]) -> String {
    errnos
        .iter()
        .map(|&n| errno_name(n))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Fails unless `res` failed with one of `errnos`.
pub fn expect_errno<T: Debug>(
    res: io::Result<T>,
    errnos: &[i32],
    what: impl Display,
) -> CaseResult {
    match res {
        Err(e) if e.raw_os_error().is_some_and(|n| errnos.contains(&n)) => Ok(()),
        Err(e) => Err(fail(format!(
            "{what}: expected {}, saw {}",
            names(errnos),
            describe(&e)
        ))),
        Ok(v) => Err(fail(format!(
            "{what}: expected {}, saw success ({v:?})",
            names(errnos)
        ))),
    }
}

/// Fails unless `code` (an errno a child process reported, 0 for success)
/// is one of `errnos`.
pub fn expect_child_errno(code: i32, errnos: &[i32], what: impl Display) -> CaseResult {
    if code == 0 {
        expect_errno(Ok(()), errnos, what)
    } else {
        expect_errno::<()>(Err(io::Error::from_raw_os_error(code)), errnos, what)
    }
}

/// Fails unless `code` (an errno a child process reported) is 0.
pub fn expect_child_ok(code: i32, what: impl Display) -> CaseResult {
    if code == 0 {
        Ok(())
    } else {
        Err(fail(format!(
            "{what}: expected success, saw {}",
            describe(&io::Error::from_raw_os_error(code))
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(r: CaseResult) -> String {
        match r {
            Err(CaseError::Fail(m)) => m,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn failures_say_what_was_expected_and_seen() {
        let enoent = || io::Error::from_raw_os_error(libc::ENOENT);
        assert!(expect_errno::<()>(Err(enoent()), &[libc::ENOENT], "open").is_ok());
        assert_eq!(
            message(expect_errno(
                Ok(3),
                &[libc::EEXIST, libc::ENOTEMPTY],
                "rmdir d"
            )),
            "rmdir d: expected EEXIST or ENOTEMPTY, saw success (3)"
        );
        assert!(message(expect_errno::<()>(
            Err(enoent()),
            &[libc::EEXIST],
            "mkdir d"
        ))
        .starts_with("mkdir d: expected EEXIST, saw ENOENT ("));
        assert!(message(expect_child_ok(libc::EACCES, "read as nobody"))
            .starts_with("read as nobody: expected success, saw EACCES ("));
        let eq = || -> CaseResult {
            ensure_eq!(1 + 1, 3, "sum of {}", "ones");
            Ok(())
        };
        assert_eq!(message(eq()), "sum of ones: expected 3, saw 2");
    }
}
