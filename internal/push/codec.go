package push

import (
	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
)

// encoded is an Update encoded once per view and sent, as the same bytes,
// to every stream of that view: with thousands of proxies, encoding per
// stream was most of a push's CPU, and each encoding took a pooled buffer
// of up to 1 MB per stream while the push was under way.
type encoded struct{ b []byte }

// Codec is the control plane's server codec: encoded updates pass through
// as they are, everything else is protobuf. Install it with
// grpc.ForceServerCodecV2.
type Codec struct{}

// Marshal implements encoding.CodecV2.
func (Codec) Marshal(v any) (mem.BufferSlice, error) {
	if e, ok := v.(*encoded); ok {
		// SliceBuffer is not pooled: gRPC reads it and frees nothing.
		return mem.BufferSlice{mem.SliceBuffer(e.b)}, nil
	}
	return encoding.GetCodecV2(grpcproto.Name).Marshal(v)
}

// Unmarshal implements encoding.CodecV2.
func (Codec) Unmarshal(data mem.BufferSlice, v any) error {
	return encoding.GetCodecV2(grpcproto.Name).Unmarshal(data, v)
}

// Name implements encoding.CodecV2: on the wire this is protobuf.
func (Codec) Name() string { return grpcproto.Name }
