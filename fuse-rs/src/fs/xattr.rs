//! Extended attributes, stored by meta. The kernel asks for sizes with a
//! zero-length buffer and expects ERANGE when a buffer is too small.

use std::ffi::CStr;
use std::io;

use fuse_backend_rs::api::filesystem::{Context, GetxattrReply, ListxattrReply};
use r3fs_wire::meta::{SetXattrRequest, XattrFlags};

use super::{errno, meta_error, name_bytes, R3fs};

const XATTR_CREATE: u32 = 1;
const XATTR_REPLACE: u32 = 2;

impl R3fs {
    pub(super) fn do_setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 {
            return Err(errno(libc::EINVAL));
        }
        let req = SetXattrRequest {
            user: self.user(ctx),
            inode,
            name: name_bytes(name),
            value: value.to_vec(),
            flags: XattrFlags {
                create: flags & XATTR_CREATE != 0,
                replace: flags & XATTR_REPLACE != 0,
            },
        };
        self.block_on(self.meta.setxattr(req))
            .map_err(|e| meta_error("setxattr", e))
    }

    pub(super) fn do_getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let user = self.user(ctx);
        let value = self
            .block_on(self.meta.getxattr(&user, inode, name.to_bytes()))
            .map_err(|e| meta_error("getxattr", e))?;
        sized(value, size).map(|v| match v {
            Sized::Count(n) => GetxattrReply::Count(n),
            Sized::Value(v) => GetxattrReply::Value(v),
        })
    }

    pub(super) fn do_listxattr(
        &self,
        ctx: &Context,
        inode: u64,
        size: u32,
    ) -> io::Result<ListxattrReply> {
        let user = self.user(ctx);
        let names = self
            .block_on(self.meta.listxattr(&user, inode))
            .map_err(|e| meta_error("listxattr", e))?;
        let mut joined = Vec::new();
        for n in names {
            joined.extend_from_slice(&n);
            joined.push(0);
        }
        sized(joined, size).map(|v| match v {
            Sized::Count(n) => ListxattrReply::Count(n),
            Sized::Value(v) => ListxattrReply::Names(v),
        })
    }

    pub(super) fn do_removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        let user = self.user(ctx);
        self.block_on(self.meta.removexattr(&user, inode, name.to_bytes()))
            .map_err(|e| meta_error("removexattr", e))
    }
}

enum Sized {
    Count(u32),
    Value(Vec<u8>),
}

/// The xattr size protocol: size 0 asks for the length; a smaller buffer
/// than the value is ERANGE.
fn sized(value: Vec<u8>, size: u32) -> io::Result<Sized> {
    if size == 0 {
        return Ok(Sized::Count(value.len() as u32));
    }
    if value.len() > size as usize {
        return Err(errno(libc::ERANGE));
    }
    Ok(Sized::Value(value))
}
