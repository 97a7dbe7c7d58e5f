// The gRPC origin of the benchmarks' gRPC figure: every unary call, to any method, is answered with
// the bytes of its request message (an elasti.echo.v1.EchoRequest holding only a message reads as an
// EchoResponse with that message) and status OK. No generated code: a codec that passes bytes through.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"os"

	"google.golang.org/grpc"
)

type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

func echo(_ any, stream grpc.ServerStream) error {
	var msg []byte
	if err := stream.RecvMsg(&msg); err != nil {
		return err
	}
	return stream.SendMsg(&msg)
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	flag.Parse()
	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer(
		grpc.ForceServerCodec(rawCodec{}), //nolint:staticcheck // the V1 codec is enough for bytes
		grpc.UnknownServiceHandler(echo),
		grpc.MaxConcurrentStreams(1000),
	)
	fmt.Fprintf(os.Stdout, "listening on %s\n", lis.Addr())
	if err := srv.Serve(lis); err != nil {
		log.Fatal(err)
	}
}
